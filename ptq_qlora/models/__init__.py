"""Models: where weights come from (Hub id, local folder, tiny-random, SmolLM2 GGUF package),
how prompts are rendered, and size/parameter helpers.

- `loading`: materialize_source, load_model_and_tokenizer, load_tokenizer
- `prompting`: render_prompt, completion_suffix
- `utils`: count_parameters, model_size_bytes, folder_size_bytes
- `tiny`, `smollm2`: the two sources built in code, cached by `cache`

Nothing heavy is imported here: the config schema imports `ptq_qlora.models.config` at compose time.
"""
