"""Task data: the paper's three external tasks plus the general-instruction mix.

    from ptq_qlora.data import load_task_data
    data = load_task_data(cfg.task, cfg.data, tokenizer=tokenizer)
    data.train / data.dev / data.test   # datasets.Dataset: id, prompt, completion, reference, source

`prompt` is the plain user instruction (no chat template); rendering happens in the model code.
Module map: sources (Hub or mirror rows) -> tasks (per-task builders, registry) -> prompts ->
mix (general instructions) -> filtering (skips, length filter) -> loading (the pipeline).
"""
from ptq_qlora.data.config import DataConfig, TaskConfig, load_yaml_config
from ptq_qlora.data.loading import COLUMNS, TaskData, load_task_data
from ptq_qlora.data.tasks import TASKS

__all__ = ["COLUMNS", "DataConfig", "TASKS", "TaskConfig", "TaskData", "load_task_data", "load_yaml_config"]
