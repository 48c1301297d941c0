"""Experiment tracking: one Weights & Biases run per Hydra job (`logger=wandb`), nothing with
`logger=none` (`tracker_for` yields None).

- Mode (`logger.mode`): `auto` is online when `WANDB_API_KEY` is set or `wandb login` stored a key
  (netrc), else offline; `WANDB_MODE` in the environment decides first. Offline runs live in
  `<job output dir>/wandb/offline-run-*`; `wandb sync <that folder>` uploads them later.
- Group: the lineage of the job's SFT stage (`sft-<lineage>`), the point that does not depend on
  anything downstream: jobs that share one SFT model (any quantizer, any QLoRA sweep value, eval-only
  jobs on its PTQ/QLoRA folders) land in one group. A chain that has no SFT stage (eval of the base
  model, PTQ of a given model folder) groups by its start: `base-<lineage>` / `input-<lineage>`.
  `logger.group` overrides it. `job_type` is `stage.name`; tags name model, quantizer, task, stage.
- Config: the resolved config as plain containers, plus git commit, package versions, machine.
- Metrics: `sft/train/*`, `ptq/*`, `qlora/train/*`, `eval/<point>/*` (+ `<prefix>/reused`: 1 when
  read back from a reused stage's record; the run is then also tagged `reused:<kind>`); per-example
  predictions as a table `eval/<point>/predictions`. HF's WandbCallback (`report_to="wandb"`)
  attaches to this run (it only calls `wandb.init` when `wandb.run` is None and never finishes it
  outside hyperparameter search) and logs TRL's per-step `train/*` there.
- Artifacts (`logger.artifacts`): each stage folder as `<kind>-<lineage>`; `reference` (default)
  adds its files as `file://` references (small files checksummed, weights by path: no upload, no
  multi-GB hashing), `upload` uploads them, `none` skips. Lineage: the produced artifact is logged
  as an output; a parent this run did not produce (a reused stage, `stage.input`) is declared with
  `use_artifact` online. W&B refuses `use_artifact` offline, so there the parents are only named in
  the artifact's metadata and in the run config's `stages`.
- Every job calls `wandb.finish` (exit code 1 when the job raised), with a fresh run id and
  `reinit="finish_previous"`, so multirun jobs never share or merge a run.
"""
from __future__ import annotations

import json
import logging
import netrc
import numbers
import os
import secrets
import string
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator
from urllib.parse import urlsplit

from omegaconf import OmegaConf

log = logging.getLogger(__name__)

MODES = ("auto", "online", "offline", "disabled")
ARTIFACT_MODES = ("reference", "upload", "none")
CHAIN = ("sft", "ptq", "qlora")
SMALL_FILE = 1 << 20  # reference entries up to this size are checksummed (configs, metrics, tokenizers)


@contextmanager
def tracker_for(cfg) -> Iterator["WandbTracker | None"]:
    """The job's tracker (None for `logger=none`); the W&B run is finished even when the job fails."""
    name = cfg.logger.name
    if name == "none":
        yield None
        return
    if name != "wandb":
        raise ValueError(f"unknown logger {name!r}; known: none, wandb")
    tracker = WandbTracker.start(cfg)
    try:
        yield tracker
    except BaseException:
        tracker.finish(exit_code=1)
        raise
    tracker.finish(exit_code=0)


def has_credentials() -> bool:
    """A W&B key is available without asking: env or the netrc entry `wandb login` writes."""
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    host = urlsplit(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    path = os.environ.get("NETRC") or os.path.expanduser("~/.netrc")
    try:
        return bool(host and netrc.netrc(path).authenticators(host))
    except (OSError, netrc.NetrcParseError):
        return False


def resolve_mode(requested: str) -> str:
    if requested not in MODES:
        raise ValueError(f"unknown logger.mode {requested!r}; known: {', '.join(MODES)}")
    if requested != "auto":
        return requested
    env = os.environ.get("WANDB_MODE")
    if env:
        return {"dryrun": "offline", "run": "online"}.get(env, env)
    return "online" if has_credentials() else "offline"


def run_group(cfg) -> str:
    """`logger.group`, else the lineage of the job's SFT stage (see the module docstring)."""
    if cfg.logger.get("group"):
        return str(cfg.logger.group)
    from ptq_qlora.runstore import is_stage_folder
    from ptq_qlora.stages.lineage import base_lineage, sft_lineage

    given, target = cfg.stage.input, cfg.stage.target
    if given is not None and Path(given).exists() and is_stage_folder(given):
        return _upstream_sft(Path(given))
    if given is None:
        point, lineage = "base", base_lineage(cfg)
    else:  # a model folder or Hub id stands in for the base (target sft) or the SFT model
        source = str(Path(given).resolve()) if Path(given).exists() else given
        point, lineage = "input", base_lineage(cfg, source=source)
    runs_sft = target == "sft" or (point == "base" and target in CHAIN and not cfg.stage.get("skip_sft"))
    return f"sft-{sft_lineage(cfg, lineage)}" if runs_sft else f"{point}-{lineage}"


def _upstream_sft(folder: Path) -> str:
    """Walk a stage folder's parents (stage.json) up to its SFT stage."""
    try:
        meta = json.loads((folder / "stage.json").read_text())
        for _ in range(len(CHAIN) + 1):
            if meta.get("kind") == "sft":
                return f"sft-{meta['lineage']}"
            parent = meta.get("parent") or meta.get("model")  # eval folders name their model
            if not parent:
                break
            upstream = folder.parent / f"{parent['point']}-{parent['lineage']}"
            if parent["point"] == "sft" or not (upstream / "stage.json").exists():
                return f"{parent['point']}-{parent['lineage']}"
            folder, meta = upstream, json.loads((upstream / "stage.json").read_text())
        return f"{meta.get('kind', 'input')}-{meta.get('lineage', folder.name)}"
    except (OSError, ValueError, KeyError):
        return f"input-{folder.name}"


def run_config(cfg) -> dict:
    from ptq_qlora.provenance import provenance

    plain = OmegaConf.to_container(cfg, resolve=True)
    prov = provenance(cfg)
    return {**plain, "seed": cfg.seed, "git_commit": prov["git_commit"], "versions": prov["versions"],
            "machine": prov["machine"]}


def run_tags(cfg) -> list[str]:
    tags = [f"model:{cfg.model.name}", f"quantizer:{cfg.quantizer.name}", f"task:{cfg.task.name}",
            f"stage:{cfg.stage.name}", *(str(t) for t in cfg.logger.get("tags") or [])]
    if cfg.experiment_name != "default":
        tags.append(f"experiment:{cfg.experiment_name}")
    return [t[:64] for t in tags]


def _scalar(value) -> bool:
    return isinstance(value, numbers.Real)  # int, float, bool, numpy scalars; not None/str/list/dict


class WandbTracker:
    """What the stages call (through JobContext): `report_to`, `log_metrics`, `log_predictions`,
    `log_stage_artifact`. `run` is the live `wandb` run."""

    def __init__(self, run, mode: str, artifacts: str = "reference"):
        self.run = run
        self.mode = mode
        self.artifacts = artifacts
        self.report_to = "none" if mode == "disabled" else "wandb"
        self._produced: set[str] = set()  # artifacts this run logged as outputs
        self._stages: dict = {}

    @classmethod
    def start(cls, cfg) -> "WandbTracker":
        import wandb

        artifacts = cfg.logger.get("artifacts") or "reference"
        if artifacts not in ARTIFACT_MODES:
            raise ValueError(f"unknown logger.artifacts {artifacts!r}; known: {', '.join(ARTIFACT_MODES)}")
        mode = resolve_mode(cfg.logger.mode)
        out_dir = Path(cfg.paths.output_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        kwargs = dict(
            project=cfg.logger.project, entity=cfg.logger.entity, group=run_group(cfg),
            job_type=cfg.stage.name, tags=run_tags(cfg), config=run_config(cfg),
            name=f"{cfg.stage.name}-{cfg.model.name}-{cfg.quantizer.name}-{cfg.task.name}",
            dir=str(out_dir), reinit="finish_previous",
        )

        def init(mode):  # a fresh id per job: a multirun job never resumes or joins another's run
            run_id = "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))
            return wandb.init(id=run_id, mode=mode, **kwargs)

        try:
            run = init(mode)
        except Exception as err:
            if cfg.logger.mode != "auto" or mode != "online":
                raise
            log.warning("W&B online init failed (%s); logging offline to %s instead", err, out_dir)
            mode, run = "offline", init("offline")
        log.info("W&B run %s (%s, group %s) in %s", run.id, mode, kwargs["group"], getattr(run, "dir", None))
        return cls(run, mode, artifacts)

    def finish(self, exit_code: int = 0) -> None:
        try:
            self.run.finish(exit_code=exit_code)
        except Exception:  # never mask the job's own error
            log.exception("wandb finish failed")

    # ----------------------------------------------------------------------------- metrics
    def log_metrics(self, metrics: dict, prefix: str, reused: bool = False) -> None:
        """Scalars only (nested values and lists are skipped) under `<prefix>/`."""
        if self.mode == "disabled":
            return
        data = {f"{prefix}/{k}": v for k, v in metrics.items() if _scalar(v)}
        data[f"{prefix}/reused"] = int(reused)
        self.run.log(data)
        if reused:  # reused:sft, reused:ptq, reused:qlora, reused:eval-sft, ...
            self._tag("reused:" + prefix.replace("/train", "").replace("/", "-"))

    def log_predictions(self, point: str, rows: Iterable[dict], reused: bool = False) -> None:
        """Per-example predictions of one evaluated point: id, prediction, reference, scores."""
        if self.mode == "disabled":
            return
        import wandb

        rows = list(rows)
        columns = ["id", "prediction", "reference"]
        for row in rows[:1]:
            columns += [k for k in row if k not in columns]
        table = wandb.Table(columns=columns, data=[[r.get(c) for c in columns] for r in rows],
                            allow_mixed_types=True)
        self.run.log({f"eval/{point}/predictions": table})

    def _tag(self, tag: str) -> None:
        tags = tuple(self.run.tags or ())
        if tag not in tags:
            self.run.tags = tags + (tag,)

    # ----------------------------------------------------------------------------- artifacts
    def log_stage_artifact(self, kind: str, lineage: str, path, parents: Iterable = (), reused: bool = False) -> None:
        """Declare a stage folder: logged as this run's output when produced here, used as an
        input when reused; `parents` (ModelRefs) this run did not produce are used as inputs."""
        if self.mode == "disabled":
            return
        name = f"{kind}-{lineage}"
        parent_refs = [(f"{p.point}-{p.lineage}", p) for p in parents]
        key = f"eval-{parent_refs[0][1].point}" if kind == "eval" and parent_refs else kind
        self._stages[key] = {
            "artifact": name, "path": str(path), "reused": reused, "parents": [n for n, _ in parent_refs]}
        self.run.config.update({"stages": dict(self._stages)}, allow_val_change=True)
        if self.artifacts == "none":
            return
        meta = {"kind": kind, "lineage": lineage, "path": str(path), "reused": reused,
                "parents": [n for n, _ in parent_refs]}
        if reused:
            self._use(name, kind, path, meta)
            return
        for parent_name, ref in parent_refs:
            if parent_name not in self._produced:
                source = ref.record.path if ref.record is not None else ref.model_path
                self._use(parent_name, ref.point, source, {"lineage": ref.lineage, "path": str(source)})
        self.run.log_artifact(self._artifact(name, kind, path, meta))
        self._produced.add(name)

    def _use(self, name: str, kind: str, path, meta: dict) -> None:
        """Declare an input artifact (W&B dedupes it by digest against the producer's version)."""
        if self.mode == "offline":  # W&B refuses use_artifact offline: the metadata carries lineage
            return
        try:
            self.run.use_artifact(self._artifact(name, kind, path, meta))
        except Exception as err:  # lineage is a nicety; never fail a job over it
            log.warning("W&B use_artifact(%s) failed: %s", name, err)

    def _artifact(self, name: str, kind: str, path, metadata: dict):
        import wandb

        art = wandb.Artifact(name, type="evaluation" if kind == "eval" else "model", metadata=metadata)
        folder = Path(str(path))
        if not folder.exists():  # a Hub id
            with art.new_file("source.txt") as f:
                f.write(str(path))
        elif self.artifacts == "upload" or kind == "eval":  # eval folders are small: keep their files
            if folder.is_dir():
                art.add_dir(str(folder), skip_cache=True, policy="immutable")
            else:
                art.add_file(str(folder), skip_cache=True, policy="immutable")
        else:
            files = sorted(p for p in folder.rglob("*") if p.is_file()) if folder.is_dir() else [folder]
            for file in files:
                rel = file.relative_to(folder).as_posix() if folder.is_dir() else file.name
                art.add_reference(f"file://{file.resolve()}", name=rel, checksum=file.stat().st_size <= SMALL_FILE)
        return art
