"""``xbmd train``: hierarchical learning, stage by stage, into a run folder, then the model bundle.

Run folder layout::

    RUN/config.yaml          the resolved config
    RUN/split.json           the patient-level train/validation split
    RUN/stage1/ stage2/ stage3/
        last.ckpt            Lightning checkpoint (config and xbmd version in its hyper_parameters):
                             an interrupted stage resumes from it
        final.pt             the stage's weights when it finished (the next stage starts from it)
        logs/                CSV (metrics.csv) and TensorBoard logs
    RUN/localiser.pt         the hip localiser
    RUN/model.pt             the model bundle ``xbmd estimate --model`` reads
    RUN/train.json           what ran, how long, final validation metrics

Stage 2 starts from stage 1's generator and discriminator; stage 3 from stage 2's generator. The
'no_stage1' ablation starts stage 2 from scratch; 'direct' runs stage 3 alone from scratch.
"""

from __future__ import annotations

import json
import logging
import os
import time
import warnings
from pathlib import Path

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

from xbmd import __version__
from xbmd.errors import InputError
from xbmd.learn import config as cfg
from xbmd.learn.data import (
    HipGroupSampler,
    StageDataset,
    load_training_data,
    patient_split,
    target_stats,
)
from xbmd.learn.module import StageModule
from xbmd.model.bundle import write_bundle

log = logging.getLogger(__name__)
STAGE_DIRS = {"1": "stage1", "2": "stage2", "3": "stage3"}


def _is_rank_zero() -> bool:
    return (
        int(os.environ.get("LOCAL_RANK", "0")) == 0 and int(os.environ.get("NODE_RANK", "0")) == 0
    )


def _previous_stage(config: dict, stage: str) -> str | None:
    if stage == "2":
        return None if config["ablation"] == "no_stage1" else "1"
    if stage == "3":
        return None if config["ablation"] == "direct" else "2"
    return None


def _stages_for(config: dict, requested: list[str]) -> list[str]:
    if config["ablation"] == "no_stage1":
        return [s for s in requested if s != "1"]
    if config["ablation"] == "direct":
        return [s for s in requested if s not in ("1", "2")]
    return requested


def train(
    dataset: str | Path,
    out: str | Path,
    config: dict,
    stages: list[str] | None = None,
    devices: int = 1,
    accelerator: str = "auto",
    progress: bool = True,
    max_steps: int | None = None,
) -> dict:
    """Train the requested stages into ``out``; write the bundle when stage 3 is done.

    ``max_steps`` caps the optimiser steps per stage (smoke tests). Returns the run summary
    (also written to RUN/train.json).
    """
    from xbmd.stages import check_output_folder

    out = check_output_folder(Path(out))
    stages = _stages_for(config, stages or list(cfg.STAGES))
    saved = out / "config.yaml"
    if saved.is_file():
        previous = cfg.load_config(saved)
        if previous != config:
            raise InputError(
                f"{out} was started with a different config ({saved}); use a new --out folder"
            )
    elif _is_rank_zero():
        saved.write_text(cfg.dump(config))
    summary_path = out / "train.json"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    summary.update({"xbmd_version": __version__, "dataset": str(Path(dataset).resolve())})
    summary.setdefault("stages", {})
    summary["warnings"] = []

    size = config["image_size"]
    nn_stages = [s for s in stages if s != "loc"]
    if nn_stages:
        data = load_training_data(dataset, size, progress=progress and _is_rank_zero())
        summary["skipped_samples"] = data.skipped
        if data.skipped:
            summary["warnings"].append(
                f"{len(data.skipped)} of {len(data.skipped) + len(data)} samples could not be "
                "read and were left out (train.json lists them)"
            )
        train_idx, val_idx = patient_split(data.patients, config["val_fraction"], config["seed"])
        patients = data.patients
        if config["val_fraction"] > 0 and not val_idx:
            summary["warnings"].append(
                f"the dataset holds one patient ({patients[0]}): no validation set (a patient is "
                "never in both), so no validation metrics; train on two patients or more"
            )
        split = {
            "train_patients": sorted({patients[i] for i in train_idx}),
            "validation_patients": sorted({patients[i] for i in val_idx}),
            "train_samples": len(train_idx),
            "validation_samples": len(val_idx),
        }
        if _is_rank_zero():
            (out / "split.json").write_text(json.dumps(split, indent=1))
        targets = list(config["stages"]["3"]["targets"])
        train_data = data.subset(train_idx)
        stats = target_stats(train_data, targets)
        summary["target_stats"] = stats
        summary["split"] = {k: v for k, v in split.items() if k.endswith("samples")}
        val_data = data.subset(val_idx) if val_idx else None
        for stage in nn_stages:
            result = _run_stage(
                stage,
                config,
                out,
                train_data,
                val_data,
                stats,
                devices,
                accelerator,
                progress,
                max_steps,
            )
            summary["stages"][stage] = result
    if "loc" in stages and _is_rank_zero():
        summary["stages"]["loc"] = _train_localiser(dataset, config, out, progress)
    if _is_rank_zero():
        bundle = _maybe_bundle(out, config, summary)
        if bundle:
            summary["model"] = str(bundle)
        summary_path.write_text(json.dumps(summary, indent=1))
    return summary


def _run_stage(
    stage: str,
    config: dict,
    out: Path,
    train_data,
    val_data,
    stats: dict,
    devices: int,
    accelerator: str,
    progress: bool,
    max_steps: int | None,
) -> dict:
    stage_dir = out / STAGE_DIRS[stage]
    final = stage_dir / "final.pt"
    if final.is_file():
        log.info("stage %s already finished (%s): skipped", stage, final)
        return {"skipped": "already finished"}
    L.seed_everything(config["seed"] + int(stage), workers=True, verbose=False)
    bmd_drr = train_data.labels["bmd_drr_g_cm2"]
    bmd_drr_sd = float(np.nanstd(bmd_drr)) if np.isfinite(bmd_drr).sum() >= 2 else 1.0
    module = StageModule(config, stage, stats, bmd_drr_sd=max(bmd_drr_sd, 1e-3))
    previous = _previous_stage(config, stage)
    if previous is not None:
        start = out / STAGE_DIRS[previous] / "final.pt"
        if not start.is_file():
            raise InputError(f"stage {stage} starts from stage {previous}, not finished in {out}")
        state = torch.load(start, map_location="cpu", weights_only=False)
        # the regression head is trained in stage 3 only: start it fresh
        backbone = {k: v for k, v in state["generator"].items() if not k.startswith("head.")}
        missing, unexpected = module.generator.load_state_dict(backbone, strict=False)
        if unexpected or any(not k.startswith("head.") for k in missing):
            raise InputError(f"{start}: weights do not fit this config's generator")
        if module.discriminator is not None and state.get("discriminator"):
            module.discriminator.load_state_dict(state["discriminator"])
    target = config["stages"][stage].get("target", "pf_drr_g_cm2")
    targets = list(config["stages"]["3"]["targets"])
    loader_args = {"batch_size": config["batch_size"], "num_workers": 0}
    train_set = StageDataset(train_data, target, targets, stats)
    hip_group = config["stages"]["3"]["hip_group"] if stage == "3" else 1
    if hip_group > 1:  # batches of radiographs of one hip (the consistency losses)
        sampler = HipGroupSampler(train_data.hips, hip_group, config["batch_size"], config["seed"])
        train_loader = torch.utils.data.DataLoader(train_set, batch_sampler=sampler, num_workers=0)
    else:
        train_loader = torch.utils.data.DataLoader(
            train_set, shuffle=True, drop_last=len(train_data) > config["batch_size"], **loader_args
        )
    val_loader = (
        torch.utils.data.DataLoader(StageDataset(val_data, target, targets, stats), **loader_args)
        if val_data is not None and len(val_data)
        else None
    )
    stage_dir.mkdir(parents=True, exist_ok=True)
    # every epoch: the newest epoch file and last.ckpt (monitor=None keeps only the latest)
    checkpoint = ModelCheckpoint(
        dirpath=stage_dir, filename="{epoch:03d}", save_last=True, save_top_k=1
    )
    loggers = [CSVLogger(stage_dir, name="logs", version="")]
    try:
        loggers.append(TensorBoardLogger(stage_dir, name="logs", version="tb"))
    except ModuleNotFoundError:  # pragma: no cover - tensorboardX is a dependency
        pass
    _quiet_lightning()
    trainer = L.Trainer(
        max_epochs=config["stages"][stage]["epochs"],
        max_steps=max_steps if max_steps else -1,
        accelerator=accelerator,
        devices=devices,
        strategy="ddp_find_unused_parameters_true" if devices > 1 else "auto",
        logger=loggers,
        callbacks=[checkpoint],
        enable_progress_bar=progress,
        enable_model_summary=False,
        log_every_n_steps=10,
        num_sanity_val_steps=0,
        # the hip-group sampler shards its batches across processes itself
        use_distributed_sampler=hip_group == 1,
        default_root_dir=stage_dir,
    )
    last = stage_dir / "last.ckpt"
    start_time = time.perf_counter()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*does not have many workers.*")
        warnings.filterwarnings("ignore", ".*smaller than the logging interval.*")
        # a resumed stage's folder holds its checkpoints on purpose
        warnings.filterwarnings("ignore", ".*Checkpoint directory .* exists and is not empty.*")
        # Lightning's own use of a deprecated PyTorch class, not ours (lightning 2.6, torch 2.13)
        warnings.filterwarnings("ignore", ".*LeafSpec.*", category=FutureWarning)
        warnings.filterwarnings("ignore", ".*LeafSpec.*", category=DeprecationWarning)
        trainer.fit(
            module, train_loader, val_loader, ckpt_path=str(last) if last.is_file() else None
        )
    seconds = time.perf_counter() - start_time
    metrics = {k: round(float(v), 5) for k, v in trainer.callback_metrics.items()}
    if trainer.is_global_zero:
        tmp = final.with_suffix(".tmp")
        torch.save(
            {
                "stage": stage,
                "config": config,
                "xbmd_version": __version__,
                "target_stats": stats,
                "generator": module.generator.state_dict(),
                "discriminator": (
                    module.discriminator.state_dict() if module.discriminator is not None else None
                ),
            },
            tmp,
        )
        tmp.replace(final)
    trainer.strategy.barrier("stage-final")  # other ranks go on once final.pt is complete
    return {
        "epochs": trainer.current_epoch,
        "steps": trainer.global_step,
        "seconds": round(seconds, 1),
        "devices": devices,
        "metrics": metrics,
    }


class _NoTips(logging.Filter):
    """Drops Lightning's advertising ("Tip: ... try installing litlogger / litmodels")."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Tip:" not in str(record.msg)


def _quiet_lightning() -> None:
    """Lightning has no option for its tips: filter them from its rank-zero loggers (once)."""
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _NoTips) for f in logger.filters):
            logger.addFilter(_NoTips())


def _train_localiser(dataset, config: dict, out: Path, progress: bool) -> dict:
    from xbmd.learn.localiser import train_localiser
    from xbmd.model.localiser import LocaliserSettings, localiser_state

    path = out / "localiser.pt"
    if path.is_file():
        return {"skipped": "already finished"}
    settings = LocaliserSettings(epochs=config["stages"]["loc"]["epochs"], seed=config["seed"])
    start = time.perf_counter()
    model, report = train_localiser(Path(dataset), settings, progress=progress)
    torch.save(localiser_state(model), path)
    return {"seconds": round(time.perf_counter() - start, 1), **report}


def _maybe_bundle(out: Path, config: dict, summary: dict) -> Path | None:
    final = out / STAGE_DIRS["3"] / "final.pt"
    if not final.is_file():
        return None
    state = torch.load(final, map_location="cpu", weights_only=False)
    loc_path = out / "localiser.pt"
    localiser = (
        torch.load(loc_path, map_location="cpu", weights_only=False) if loc_path.is_file() else None
    )
    return write_bundle(
        out / "model.pt",
        config=config,
        generator_state=state["generator"],
        target_stats=state["target_stats"],
        localiser=localiser,
        training={k: v for k, v in summary.items() if k != "dataset"},
    )
