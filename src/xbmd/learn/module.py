"""The Lightning module of one training stage.

- Stages 1 and 2 (decomposition): conditional GAN, manual optimisation. The discriminator is
  stepped on LSGAN real/fake, then the generator on
  ``gan x LSGAN + feature_matching x FM + l1 x L1 + gc x (1 - GC) + mask x BCE(region)``.
  Learning rate constant for the first half of the epochs, then linearly to 0 (as published).
- Stage 3 (regression): the head on the encoder's deepest features predicts the standardised
  targets (smooth L1); the encoder is fine-tuned at a lower rate while ``keep_decomposition`` x L1
  on the proximal-femur DRR (plus the region BCE) keeps the decoder's virtual X-ray valid. The
  'direct' ablation trains encoder and head from scratch on the regression alone.
  Levers (docs/training.md): with ``regression.kvp`` the head also gets the kVp input, hidden
  (unknown) with probability ``regression.kvp_dropout`` per training sample; with
  ``stages.3.hip_group`` > 1 the batches hold groups of radiographs of one hip
  (:class:`xbmd.learn.data.HipGroupSampler`) and the loss adds ``consistency`` x their
  within-group variance of the standardised predicted targets and ``consistency_drr`` x that of
  the virtual X-ray's BMD_drr divided by ``bmd_drr_sd`` (:func:`xbmd.learn.losses.group_variance`).
"""

from __future__ import annotations

import lightning as L
import torch
from torch.nn import functional as F

from xbmd import __version__
from xbmd.learn.data import augment
from xbmd.learn.losses import (
    MultiScaleDiscriminator,
    adversarial_loss,
    feature_matching_loss,
    gradient_correlation_loss,
    group_variance,
)
from xbmd.model.inputs import region_bmd
from xbmd.model.networks import IN_CHANNELS, build_generator
from xbmd.similarity import psnr


class StageModule(L.LightningModule):
    """One stage ('1', '2' or '3') of hierarchical learning for a resolved ``config``.

    ``bmd_drr_sd``: the training set's SD of BMD_drr (g/cm2), the scale of the BMD_drr
    consistency loss (so that its weight means what ``consistency``'s does).
    """

    def __init__(
        self,
        config: dict,
        stage: str,
        target_stats: dict,
        xbmd_version: str = __version__,
        bmd_drr_sd: float = 1.0,
    ):
        super().__init__()
        self.save_hyperparameters()
        self.config = config
        self.stage = stage
        self.automatic_optimization = False
        self.generator = build_generator(config)
        self.decomposition = stage in ("1", "2")
        d = config["discriminator"]
        self.discriminator = (
            MultiScaleDiscriminator(IN_CHANNELS + 1, d["scales"], d["layers"], d["channels"])
            if self.decomposition
            else None
        )
        self.targets = list(config["stages"]["3"]["targets"])
        self.stats = target_stats
        self.region_probability = float(config["region_probability"])
        self.bmd_drr_sd = float(bmd_drr_sd)

    # --------------------------------------------------------------------------------------------
    def configure_optimizers(self):
        opt = self.config["optimizer"]
        betas = tuple(opt["betas"])
        epochs = max(1, self.config["stages"][self.stage]["epochs"])

        def decay(epoch: int) -> float:
            half = epochs // 2
            return 1.0 if epoch < half else max(0.0, 1.0 - (epoch - half) / max(1, epochs - half))

        if self.decomposition:
            opt_g = torch.optim.AdamW(
                self.generator.backbone.parameters(),
                lr=opt["lr"],
                betas=betas,
                weight_decay=opt["weight_decay"],
            )
            opt_d = torch.optim.AdamW(
                self.discriminator.parameters(),
                lr=opt["lr"],
                betas=betas,
                weight_decay=opt["weight_decay"],
            )
            scheds = [torch.optim.lr_scheduler.LambdaLR(o, decay) for o in (opt_g, opt_d)]
            return [opt_g, opt_d], scheds
        s3 = self.config["stages"]["3"]
        direct = self.config["ablation"] == "direct"
        groups = [
            {"params": self.generator.head.parameters(), "lr": s3["lr"]},
            {
                "params": self.generator.backbone.parameters(),
                "lr": s3["lr"] if direct else s3["encoder_lr"],
            },
        ]
        opt3 = torch.optim.AdamW(groups, betas=(0.9, 0.999), weight_decay=opt["weight_decay"])
        return [opt3], [torch.optim.lr_scheduler.LambdaLR(opt3, decay)]

    # --------------------------------------------------------------------------------------------
    def _augmented(self, batch):
        x, drr, region, labels, _, kvp, hip = batch
        if self.config["augment"]["enabled"]:
            x, (drr, region) = augment(x, [drr, region], self.config["augment"])
            region = (region > 0.5).float()
        return x, drr, region, labels, kvp, hip

    def training_step(self, batch, batch_idx):
        if self.decomposition:
            return self._gan_step(batch)
        return self._regression_step(batch)

    def _gan_step(self, batch):
        x, drr, region, _, _, _ = self._augmented(batch)
        w = self.config["losses"]
        opt_g, opt_d = self.optimizers()
        maps, _ = self.generator(x, regress=False)
        fake, logit = maps[:, 0], maps[:, 1]
        real_pair = torch.cat([x, drr[:, None]], dim=1)

        # discriminator
        d_real = self.discriminator(real_pair)
        d_fake = self.discriminator(torch.cat([x, fake[:, None].detach()], dim=1))
        loss_d = 0.5 * (
            adversarial_loss(d_real, True, True) + adversarial_loss(d_fake, False, True)
        )
        opt_d.zero_grad()
        self.manual_backward(loss_d)
        opt_d.step()

        # generator
        d_fake = self.discriminator(torch.cat([x, fake[:, None]], dim=1))
        terms = {
            "gan": adversarial_loss(d_fake, True, False),
            "feature_matching": feature_matching_loss(d_fake, d_real),
            "l1": F.l1_loss(fake, drr),
            "gc": gradient_correlation_loss(fake, drr),
            "mask": F.binary_cross_entropy_with_logits(logit, region),
        }
        loss_g = sum(w[k] * v for k, v in terms.items())
        opt_g.zero_grad()
        self.manual_backward(loss_g)
        opt_g.step()
        # the discriminator's gradients from the generator step are discarded at its next step
        self.log_dict(
            {
                "train/loss_g": loss_g,
                "train/loss_d": loss_d,
                **{f"train/{k}": v for k, v in terms.items()},
            },
            prog_bar=False,
            on_step=False,
            on_epoch=True,
            batch_size=x.shape[0],
            sync_dist=True,
        )
        self.log(
            "loss_g", loss_g, prog_bar=True, on_step=True, on_epoch=False, batch_size=x.shape[0]
        )
        return loss_g

    def _kvp_dropped(self, kvp: torch.Tensor) -> torch.Tensor:
        """The kVp input with each sample's hidden (unknown: zeros) with ``kvp_dropout``."""
        p = float(self.config["regression"]["kvp_dropout"])
        hidden = torch.rand(kvp.shape[0], device=kvp.device) < p
        return torch.where(hidden[:, None], torch.zeros_like(kvp), kvp)

    def _regression_step(self, batch):
        x, drr, region, labels, kvp, hip = self._augmented(batch)
        s3 = self.config["stages"]["3"]
        keep = 0.0 if self.config["ablation"] == "direct" else s3["keep_decomposition"]
        grouped = s3["hip_group"] > 1  # the consistency losses need batches of hip groups
        w_pred = s3["consistency"] if grouped else 0.0
        w_drr = s3["consistency_drr"] if grouped else 0.0
        opt = self.optimizers()
        maps, pred = self.generator(x, decode=keep > 0 or w_drr > 0, kvp=self._kvp_dropped(kvp))
        ok = torch.isfinite(labels)
        loss_reg = F.smooth_l1_loss(pred[ok], labels[ok]) if ok.any() else pred.sum() * 0
        loss = loss_reg
        parts = {"train/regression": loss_reg}
        if keep > 0:
            loss = (
                loss
                + keep * F.l1_loss(maps[:, 0], drr)
                + F.binary_cross_entropy_with_logits(maps[:, 1], region)
            )
        if w_pred > 0:
            parts["train/consistency"] = group_variance(pred, hip)
            loss = loss + w_pred * parts["train/consistency"]
        if w_drr > 0:
            parts["train/consistency_drr"] = group_variance(
                self._bmd_drr(maps) / self.bmd_drr_sd, hip
            )
            loss = loss + w_drr * parts["train/consistency_drr"]
        opt.zero_grad()
        self.manual_backward(loss)
        opt.step()
        self.log_dict(
            {"train/loss": loss, **parts},
            on_step=False,
            on_epoch=True,
            batch_size=x.shape[0],
            sync_dist=True,
        )
        self.log("loss", loss, prog_bar=True, on_step=True, on_epoch=False, batch_size=x.shape[0])
        return loss

    def _bmd_drr(self, maps: torch.Tensor) -> torch.Tensor:
        """(B,) BMD_drr of the virtual X-rays (g/cm2) as :func:`region_bmd`, NaN where the region
        is empty; differentiable through the DRR (the region is a threshold), NaN-free gradient."""
        region = (torch.sigmoid(maps[:, 1]) > self.region_probability).to(maps.dtype)
        area = region.sum((1, 2))
        bmd = (maps[:, 0].clamp_min(0) * region).sum((1, 2)) / area.clamp_min(1)
        return torch.where(area > 0, bmd, torch.full_like(bmd, float("nan")))

    def on_train_epoch_end(self) -> None:
        scheds = self.lr_schedulers()
        for s in scheds if isinstance(scheds, list) else [scheds]:
            s.step()

    # --------------------------------------------------------------------------------------------
    def validation_step(self, batch, batch_idx):
        x, drr, _, labels, bmd_drr, kvp, _ = batch
        direct = self.config["ablation"] == "direct"
        maps, pred = self.generator(x, decode=not (self.stage == "3" and direct), kvp=kvp)
        metrics = {}
        if maps is not None:
            fake = maps[:, 0].clamp_min(0)  # as the bundle predicts
            metrics["val/l1"] = F.l1_loss(fake, drr)
            metrics["val/psnr_db"] = psnr(fake, drr).mean()
            if self.stage != "1":
                mine = region_bmd(fake, torch.sigmoid(maps[:, 1]) > self.region_probability)
                err = (mine - bmd_drr).abs() / bmd_drr
                metrics["val/bmd_drr_abs_error_pct"] = 100 * torch.nanmean(err)
        if pred is not None and self.stage == "3":
            for j, t in enumerate(self.targets):
                sd = self.stats[t][1]
                ok = torch.isfinite(labels[:, j])
                if ok.any():
                    diff = (pred[ok, j] - labels[ok, j]).abs() * sd
                    metrics[f"val/mae_{t}"] = diff.mean()
        self.log_dict(metrics, on_epoch=True, prog_bar=True, batch_size=x.shape[0], sync_dist=True)
