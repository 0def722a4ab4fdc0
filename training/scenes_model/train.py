"""Train the scenes model: the VAE on renders, latents cached, then the U-Net and the text encoder.

Every random draw of step s comes from a generator seeded with (seed, stage, s), and checkpoints
(atomic, every `checkpoint_every` steps) hold weights, EMA weights and optimizer moments: a killed
job rerun with the same command continues and ends with the weights an uninterrupted run has.
Under torchrun each rank takes its slice of every global batch and DDP averages the gradients
(gloo on CPU, nccl on GPU), so the global batch and the draws do not depend on the world size.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ldmprobe.atomic import write_json

from ..fit import Dist, init_dist
from . import checkpoint
from .architecture import build_components, scheduler_config
from .data import render_training_set, to_tensor, world

STAGE_IDS = {"vae": 1, "latents": 2, "unet": 3, "decoder": 4}
STAGES = ("vae", "decoder", "unet")  # what --only may pick; latents follow the VAE
# The stage each setting belongs to (others: the VAE's, i.e. fixed from the start). A setting may change
# between invocations until its stage has a checkpoint.
STAGE_SETTINGS = {"vae_crop": "vae", "decoder_steps": "decoder", "decoder_lr": "decoder", "unet_steps": "unet", "batch": "unet",
                  "lr": "unet", "cfg_dropout": "unet", "ema_decay": "unet", "checkpoint_every": "unet", "dtype": "unet",
                  "snr_floor": "unet", "snr_cap": "unet", "guided_below": "unet", "guided_scale": "unet",
                  "guided_weight": "unet"}


@dataclass
class TrainConfig:
    """Every setting of a run; recorded in job.json, and a rerun must match it to resume."""

    seed: int = 0
    scenes: int = 12000  # training renders (held-out captions never among them)
    size: int = 128
    vae_steps: int = 800
    vae_batch: int = 32
    vae_crop: int = 64  # the VAE trains on random crops of this side (whole images when >= size)
    vae_lr: float = 1e-3
    kl_weight: float = 1e-6  # SD's KL weight: latents stay close to deterministic
    decoder_steps: int = 0  # optional; decoder fine-tuning with the encoder frozen (SD's ft-MSE VAE): latents unchanged
    decoder_lr: float = 5e-4
    unet_steps: int = 3500
    batch: int = 32
    lr: float = 1e-3
    warmup: int = 200
    cfg_dropout: float = 0.1  # captions replaced by "" so the model also learns the unconditional score
    ema_decay: float = 0.999
    # Loss weighting over timesteps (see timestep_weights); 0 and 0 = SD's plain epsilon MSE.
    snr_floor: float = 0.0
    snr_cap: float = 0.0
    # The guided term (see _DenoiseLoss): on samples with t < guided_below, also the MSE of the guided
    # prediction at guided_scale, times guided_weight. 0 = off (SD's training).
    guided_below: int = 0
    guided_scale: float = 7.5
    guided_weight: float = 0.1
    checkpoint_every: int = 100
    dtype: str = "float16"  # weights of the exported folder
    init: str = ""  # a diffusers folder of this architecture to continue from ("" = fresh weights)


def _generator(seed: int, stage: str, step: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + STAGE_IDS[stage] * 100_003 + step)


def _lr(base: float, step: int, total: int, warmup: int) -> float:
    """Linear warm-up, then cosine decay to a tenth."""
    warm = min(1.0, (step + 1) / max(1, warmup))
    return base * warm * (0.1 + 0.45 * (1 + math.cos(math.pi * step / max(1, total))))


class _VAELoss(torch.nn.Module):
    """Reconstruction (L1 + MSE) of a posterior sample plus a small KL: one module for DDP to wrap."""

    def __init__(self, vae, kl_weight: float):
        super().__init__()
        self.vae, self.kl_weight = vae, kl_weight

    def forward(self, x: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        posterior = self.vae.encode(x).latent_dist
        z = posterior.mean + posterior.std * eps
        rec = self.vae.decode(z).sample
        return (rec - x).abs().mean() + F.mse_loss(rec, x) + self.kl_weight * posterior.kl().mean()


class _DecoderLoss(torch.nn.Module):
    """Reconstruction from the frozen encoder's posterior mean (the latents the U-Net learns)."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae
        vae.encoder.requires_grad_(False)
        vae.quant_conv.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            z = self.vae.encode(x).latent_dist.mean
        rec = self.vae.decode(z).sample
        return (rec - x).abs().mean() + F.mse_loss(rec, x)


def timestep_weights(alphas_cumprod: torch.Tensor, snr_floor: float = 0.0, snr_cap: float = 0.0) -> torch.Tensor:
    """Per-timestep weights of the epsilon MSE, mean 1 over the timesteps.

    The epsilon MSE is SNR(t) times the MSE of the implied clean latent, so at the noisy end of SD's
    schedule (SNR 0.005 at t = 999) what the caption decides — the object's colour, its place — reaches
    the loss at a few thousandths of the weight of fine detail at t ~ 200. Weighting by
    clamp(SNR, floor, cap) / SNR gives the clean-latent error the weight `floor` where SNR < floor (the
    noisy steps count more) and caps easy, nearly clean steps at `cap` (min-SNR-γ, Hang et al. 2023).
    The target stays epsilon: the scheduler, the sampler and the study's loop are unchanged."""
    snr = alphas_cumprod / (1 - alphas_cumprod)
    lam = snr
    if snr_floor > 0:
        lam = lam.clamp(min=snr_floor)
    if snr_cap > 0:
        lam = lam.clamp(max=snr_cap)
    w = lam / snr
    return w / w.mean()


class _DenoiseLoss(torch.nn.Module):
    """Epsilon-prediction MSE of the U-Net conditioned on the (trained) text encoder, optionally
    weighted per timestep (timestep_weights), optionally with the guided term.

    The guided term: on the nearly clean steps (t < guided_below) the caption decides nothing the noisy
    latent does not already show, so the conditional and unconditional predictions should agree, and
    the guided prediction u + s·(c − u) be a denoiser as good as either. A small model does not learn
    that agreement from the plain loss, and at the study's s = 7.5 the LMS sampler's last step (t = 71,
    the largest multistep coefficients) multiplies their disagreement into latents far outside the
    VAE's range. The term is the MSE of u + s·(c − u) to the noise on those samples (an extra
    unconditional forward for them), times guided_weight. Training-side only: sampler, scale and
    loop stay the study's."""

    def __init__(self, unet, text_encoder, noise_scheduler, weights: torch.Tensor | None = None,
                 empty_ids: torch.Tensor | None = None, guided_below: int = 0, guided_scale: float = 7.5,
                 guided_weight: float = 0.0):
        super().__init__()
        self.unet, self.text_encoder, self.sched = unet, text_encoder, noise_scheduler
        self.register_buffer("weights", weights if weights is not None else torch.empty(0), persistent=False)
        self.register_buffer("empty_ids", empty_ids if empty_ids is not None else torch.empty(0, dtype=torch.long),
                             persistent=False)
        self.guided_below, self.guided_scale, self.guided_weight = guided_below, guided_scale, guided_weight
        if guided_below > 0 and guided_weight > 0 and not self.empty_ids.numel():
            raise ValueError("the guided term needs the empty caption's token ids")

    def forward(self, latents, ids, noise, t) -> torch.Tensor:
        noisy = self.sched.add_noise(latents, noise, t)
        cond = self.text_encoder(ids)[0]
        pred = self.unet(noisy, t, cond).sample
        err = (pred - noise).pow(2).mean(dim=(1, 2, 3))
        if self.weights.numel():
            err = err * self.weights.to(err.device)[t]
        loss = err.mean()
        low = t < self.guided_below
        if self.guided_weight > 0 and bool(low.any()):
            empty = self.text_encoder(self.empty_ids[None])[0].expand(int(low.sum()), -1, -1)
            uncond = self.unet(noisy[low], t[low], empty).sample
            guided = uncond + self.guided_scale * (pred[low] - uncond)
            loss = loss + self.guided_weight * (guided - noise[low]).pow(2).mean(dim=(1, 2, 3)).sum() / len(t)
        return loss


class Trainer:
    def __init__(self, out: Path, cfg: TrainConfig, progress: bool = True, stop_after: int | None = None,
                 only: str | None = None):
        """only: run just that stage (vae, decoder or unet) and stop — the decoder and the U-Net
        depend only on the VAE's encoder, so two processes can train them side by side."""
        self.out, self.cfg, self.progress, self.stop_after, self.only = Path(out), cfg, progress, stop_after, only
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.dist: Dist = init_dist(self.device)
        if self.device.type == "cuda":
            self.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(self.device)
        elif "OMP_NUM_THREADS" not in os.environ:
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // self.dist.world))
        self.unet, self.vae, self.text_encoder, self.tokenizer = build_components(cfg.seed, cfg.size)
        self.init_scale = self._load_init(cfg.init) if cfg.init else None
        self.job_path = self.out / "job.json"
        self.job = self._job()

    def _load_init(self, folder: str) -> float:
        """Weights of a trained folder (fp16 is widened to fp32) to continue training from; returns
        its VAE's scaling_factor, which the latents keep so the U-Net sees the scale it learned on."""
        from ldmprobe.models import load_model

        init = load_model(folder, device="cpu", dtype="float32")
        for mine, theirs in ((self.unet, init.unet), (self.vae, init.vae), (self.text_encoder, init.text_encoder)):
            mine.load_state_dict(theirs.state_dict())
        return float(init.vae.config.scaling_factor)

    # ---- bookkeeping
    def _job(self) -> dict:
        config = dataclasses.asdict(self.cfg)
        if self.job_path.is_file():
            job = json.loads(self.job_path.read_text())
            stored = job.get("config") or {}
            # settings added to the job after a run started are accepted at their defaults; settings of
            # stages that have not started yet may change (their checkpoints do not exist)
            defaults = dataclasses.asdict(TrainConfig())
            frozen = [k for k in config if self._started(STAGE_SETTINGS.get(k, "vae"))]
            changed = [k for k in frozen if stored.get(k, defaults[k]) != config[k]]
            if changed or set(stored) - set(config):
                raise ValueError(f"{self.out} holds a run with other settings ({', '.join(changed) or 'unknown keys'}: "
                                 f"{ {k: stored.get(k) for k in changed} }); use another --out")
            job["config"] = config
            return job
        if self.out.exists() and {p.name for p in self.out.iterdir()} - {"data"}:  # a render cache may be reused
            raise ValueError(f"{self.out} exists and holds something else; use an empty or new --out")
        job = {"job": "training.scenes_model", "config": config, "wall_s": {}, "world_size": self.dist.world,
               "device": self.device.type, "torch": torch.__version__}
        self._barrier()  # every rank has looked at --out before the main one writes into it
        if self.dist.main:
            write_json(self.job_path, job)
        return job

    def _started(self, stage: str) -> bool:
        return stage == "vae" or (self.out / f"{stage}.checkpoint.safetensors").is_file()

    def _add_time(self, stage: str, seconds: float) -> None:
        """Accumulate a stage's wall time; merged with job.json on disk, where a process training
        another stage side by side (--only) records its own."""
        if self.job_path.is_file():
            on_disk = json.loads(self.job_path.read_text())
            for key in ("wall_s", "loss"):
                self.job[key] = {**on_disk.get(key, {}), **{k: v for k, v in self.job.get(key, {}).items()
                                                             if k not in on_disk.get(key, {}) or k == stage}}
        self.job["wall_s"][stage] = round(self.job["wall_s"].get(stage, 0.0) + seconds, 1)
        if self.dist.main:
            write_json(self.job_path, self.job)

    def _barrier(self) -> None:
        if self.dist.world > 1:
            torch.distributed.barrier()

    def _wrap(self, module: torch.nn.Module) -> torch.nn.Module:
        if self.dist.world == 1:
            return module
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(module, device_ids=[self.device.index] if self.device.type == "cuda" else None)

    def _slice(self, t: torch.Tensor) -> torch.Tensor:
        return t[self.dist.rank::self.dist.world]

    # ---- stages
    def run(self) -> dict:
        t0 = time.perf_counter()
        data = render_training_set(self.out / "data", self.cfg.scenes, self.cfg.size, self.progress and self.dist.main) \
            if self.dist.main else None
        self._barrier()
        if data is None:
            data = render_training_set(self.out / "data", self.cfg.scenes, self.cfg.size, False)
        if "render" not in self.job["wall_s"]:
            self._add_time("render", time.perf_counter() - t0)
        self.captions = data["captions"]
        images = data["images"]
        if not self._train_vae(images) or self.only == "vae":
            return self.job
        if self.only != "unet" and cfg_decoder(self.cfg) and not self._train_decoder(images) or self.only == "decoder":
            return self.job
        latents = self._latents(images)
        if not self._train_unet(latents) or self.only == "unet":
            return self.job
        if self.dist.main:
            self._reconcile_times()
            self.export()
        self._barrier()
        return self.job

    def _reconcile_times(self) -> None:
        """Each stage's checkpoint carries its own accumulated wall time: the record that survives
        two processes writing job.json side by side."""
        for stage in ("vae", "decoder", "unet"):
            path = self.out / f"{stage}.checkpoint.safetensors"
            seconds = checkpoint.meta(path).get("wall_s") if path.is_file() else None
            if seconds is not None:
                self.job["wall_s"][stage] = max(self.job["wall_s"].get(stage, 0.0), seconds)
        write_json(self.job_path, self.job)

    def _load_vae(self) -> None:
        """The trained VAE (encoder and first decoder) from its checkpoint."""
        checkpoint.load(self.out / "vae.checkpoint.safetensors", {"vae": self.vae}, None)

    def _train_decoder(self, images: np.ndarray) -> bool:
        """Fine-tune the decoder on the encoder's posterior means, the encoder frozen: the U-Net's
        latents do not move, the decoded images get sharper and truer in colour."""
        cfg, path = self.cfg, self.out / "decoder.checkpoint.safetensors"
        self._load_vae()
        vae = self.vae.to(self.device)
        decoder = torch.nn.ModuleDict({"post_quant_conv": vae.post_quant_conv, "decoder": vae.decoder})
        opt = torch.optim.AdamW(decoder.parameters(), lr=cfg.decoder_lr, weight_decay=0.0)
        step = checkpoint.load(path, {"decoder": decoder}, opt)["step"] if path.is_file() else 0
        if step >= cfg.decoder_steps:
            return True
        model = self._wrap(_DecoderLoss(vae))
        decoder.train()
        return self._loop("decoder", model, opt, step, cfg.decoder_steps, cfg.decoder_lr, path, {"decoder": decoder},
                          lambda s, g: self._vae_batch(images, g)[:1])

    def _train_vae(self, images: np.ndarray) -> bool:
        cfg, path = self.cfg, self.out / "vae.checkpoint.safetensors"
        vae = self.vae.to(self.device).train()
        opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
        if cfg.init and not path.is_file() and self.dist.main:  # the init's VAE is kept as is: no VAE stage
            checkpoint.save(path, {"vae": vae}, opt, {"step": cfg.vae_steps, "loss": None, "wall_s": 0.0,
                                                      "init": cfg.init})
        self._barrier()
        step = checkpoint.load(path, {"vae": vae}, opt)["step"] if path.is_file() else 0
        if step >= cfg.vae_steps:
            return True
        model = self._wrap(_VAELoss(vae, cfg.kl_weight))
        return self._loop("vae", model, opt, step, cfg.vae_steps, cfg.vae_lr, path, {"vae": vae},
                          lambda s, g: self._vae_batch(images, g))

    def _vae_batch(self, images: np.ndarray, g: torch.Generator):
        cfg = self.cfg
        crop = min(cfg.vae_crop, cfg.size)
        idx = torch.randint(len(images), (cfg.vae_batch,), generator=g)
        flip = torch.rand(cfg.vae_batch, generator=g) < 0.5
        corner = torch.randint(0, cfg.size - crop + 1, (cfg.vae_batch, 2), generator=g) // 8 * 8
        eps = torch.randn(cfg.vae_batch, 4, crop // 8, crop // 8, generator=g)
        idx, flip, corner, eps = self._slice(idx), self._slice(flip), self._slice(corner), self._slice(eps)
        x = to_tensor(images[idx.numpy()])
        x = torch.stack([xi[:, r:r + crop, c:c + crop] for xi, (r, c) in zip(x, corner.tolist(), strict=True)])
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        return x.to(self.device), eps.to(self.device)

    def _loop(self, stage, model, opt, step, total, base_lr, path, saved, batch_fn, ema=None) -> bool:
        from tqdm.auto import tqdm

        cfg = self.cfg
        t0, losses = time.perf_counter(), []
        stage_s = checkpoint.meta(path).get("wall_s", 0.0) if path.is_file() else 0.0
        bar = tqdm(total=total, initial=step, desc=f"train {stage}", unit="step", disable=not (self.progress and self.dist.main))
        while step < total:
            for group in opt.param_groups:
                group["lr"] = _lr(base_lr, step, total, cfg.warmup)
            loss = model(*batch_fn(step, _generator(cfg.seed, stage, step)))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], 1.0)
            opt.step()
            step += 1
            if ema is not None:
                ema.update(step)
            losses.append(float(loss))
            bar.update()
            bar.set_postfix(loss=f"{np.mean(losses[-50:]):.4f}")
            if step % cfg.checkpoint_every == 0 or step == total:
                stage_s += time.perf_counter() - t0
                if self.dist.main:
                    checkpoint.save(path, saved, opt, {"step": step, "loss": float(np.mean(losses[-50:])),
                                                       "wall_s": round(stage_s, 1)})
                    self.job.setdefault("loss", {})[stage] = round(float(np.mean(losses[-50:])), 5)
                self._barrier()
                self._add_time(stage, time.perf_counter() - t0)
                t0 = time.perf_counter()
                if self.stop_after is not None and step >= self.stop_after:
                    bar.close()
                    return False
        bar.close()
        return True

    @torch.no_grad()
    def _latents(self, images: np.ndarray) -> torch.Tensor:
        """Posterior means of every render, scaled to unit variance (the VAE's scaling_factor is set
        to 1 / std, as SD's 0.18215 was)."""
        path = self.out / "latents.safetensors"
        from safetensors.torch import load_file, save_file

        from ldmprobe.atomic import atomic_path

        vae = self.vae.eval()
        if not path.is_file() and self.dist.main:
            t0 = time.perf_counter()
            from tqdm.auto import tqdm

            chunks = []
            for i in tqdm(range(0, len(images), 64), desc="latents", unit="batch", disable=not self.progress):
                chunks.append(vae.encode(to_tensor(images[i:i + 64]).to(self.device)).latent_dist.mean.cpu())
            lat = torch.cat(chunks)  # [N, 4, h, w]
            scale = self.init_scale or float(1.0 / lat.std())
            with atomic_path(path) as tmp:
                save_file({"latents": lat.contiguous(), "scaling_factor": torch.tensor(scale)}, str(tmp))
            self._add_time("latents", time.perf_counter() - t0)
        self._barrier()
        data = load_file(str(path))
        scale = float(data["scaling_factor"])
        vae.register_to_config(scaling_factor=scale)
        self.job["scaling_factor"] = scale
        return data["latents"] * scale

    def _train_unet(self, latents: torch.Tensor) -> bool:
        from diffusers import DDPMScheduler

        cfg, path = self.cfg, self.out / "unet.checkpoint.safetensors"
        unet, text = self.unet.to(self.device).train(), self.text_encoder.to(self.device).train()
        params = [*unet.parameters(), *text.parameters()]
        opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.01)
        ema = _EMA({"unet": unet, "text_encoder": text}, cfg.ema_decay)
        saved = {"unet": unet, "text_encoder": text, "ema_unet": ema.shadow["unet"], "ema_text_encoder": ema.shadow["text_encoder"]}
        step = checkpoint.load(path, saved, opt)["step"] if path.is_file() else 0
        if step >= cfg.unet_steps:
            return True
        ids = self.tokenizer(self.captions + [""], padding="max_length", max_length=77, truncation=True,
                             return_tensors="pt").input_ids
        ids, empty = ids[:-1], ids[-1]
        n = len(self.captions)
        noise_scheduler = DDPMScheduler.from_config(scheduler_config())
        weights = None
        if cfg.snr_floor > 0 or cfg.snr_cap > 0:
            weights = timestep_weights(noise_scheduler.alphas_cumprod, cfg.snr_floor, cfg.snr_cap)
        model = self._wrap(_DenoiseLoss(unet, text, noise_scheduler, weights, empty, cfg.guided_below,
                                        cfg.guided_scale, cfg.guided_weight))

        def batch(step, g):
            idx = torch.randint(n, (cfg.batch,), generator=g)
            t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (cfg.batch,), generator=g)
            noise = torch.randn(cfg.batch, *latents.shape[1:], generator=g)
            drop = torch.rand(cfg.batch, generator=g) < cfg.cfg_dropout
            tok = torch.where(drop[:, None], empty[None], ids[idx])
            return tuple(self._slice(v).to(self.device) for v in (latents[idx], tok, noise, t))

        return self._loop("unet", model, opt, step, cfg.unet_steps, cfg.lr, path, saved, batch, ema=ema)

    def export(self) -> Path:
        """The EMA weights as a diffusers-format folder `out/model` (atomic: built beside, renamed)."""
        from ldmprobe.models import SDModel, save_model

        self._load_vae()
        if (self.out / "decoder.checkpoint.safetensors").is_file():
            decoder = torch.nn.ModuleDict({"post_quant_conv": self.vae.post_quant_conv, "decoder": self.vae.decoder})
            checkpoint.load(self.out / "decoder.checkpoint.safetensors", {"decoder": decoder}, None)
        self.vae.register_to_config(scaling_factor=float(load_file_scale(self.out)))
        saved = {"ema_unet": _EMA.fresh(self.unet), "ema_text_encoder": _EMA.fresh(self.text_encoder)}
        checkpoint.load(self.out / "unet.checkpoint.safetensors", saved, None)
        self.unet.load_state_dict(saved["ema_unet"], strict=False)
        self.text_encoder.load_state_dict(saved["ema_text_encoder"], strict=False)
        dtype = getattr(torch, self.cfg.dtype)
        modules = [m.to("cpu", dtype).eval() for m in (self.unet, self.vae, self.text_encoder)]
        model = SDModel(*modules, self.tokenizer, scheduler_config(), "scenes", torch.device("cpu"), dtype, "sdpa")
        final, tmp = self.out / "model", self.out / "model.partial"
        shutil.rmtree(tmp, ignore_errors=True)
        save_model(model, tmp)
        write_json(tmp / "world.json", world())
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for m in modules:
            m.float()
        return final


def cfg_decoder(cfg: TrainConfig) -> bool:
    return cfg.decoder_steps > 0


def load_file_scale(out: Path) -> float:
    from safetensors.torch import load_file

    return float(load_file(str(out / "latents.safetensors"))["scaling_factor"])


class _EMA:
    """Exponential moving average of the float weights, decay warmed up as (1 + s) / (10 + s)."""

    def __init__(self, modules: dict[str, torch.nn.Module], decay: float):
        self.modules, self.decay = modules, decay
        self.shadow = {name: self.fresh(m) for name, m in modules.items()}

    @staticmethod
    def fresh(module: torch.nn.Module) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in module.state_dict().items() if v.is_floating_point()}

    @torch.no_grad()
    def update(self, step: int) -> None:
        d = min(self.decay, (1 + step) / (10 + step))
        for name, module in self.modules.items():
            shadow = self.shadow[name]
            for k, v in module.state_dict().items():
                if k in shadow:
                    shadow[k].lerp_(v, 1 - d)
