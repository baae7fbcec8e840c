"""The configuration of a DPM pre-training run, without torch: the CLI checks flags, reads
the shards' manifest and says what it is about to do before paying for ``import torch``."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field

# The backbones of biqa.training.models (named here too, so flags are checked without torch;
# a test keeps the two lists equal).
ARCHS = ("botnet50", "botnet50-vipnet", "resnet50", "resnet18", "tiny")
AMP_DTYPES = ("bf16", "fp16")
RANK_PAIRS = ("group", "reference")


def check_device_name(name: str | None) -> None:
    """auto (or None), cpu, cuda or cuda:N; anything else is refused before torch loads."""
    device = name or "auto"
    if device not in ("auto", "cpu", "cuda") and not (
            device.startswith("cuda:") and device[5:].isdigit()):
        raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {name!r}")


def available_cores() -> int:
    """The cores this process may use (affinity and cgroup-pinned sets respected)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def default_workers() -> int:
    """Loader workers per process: the cores available, shared among the ranks of this
    machine, less one for the training loop itself (at least one)."""
    local_world = max(int(os.environ.get("LOCAL_WORLD_SIZE", "1")), 1)
    return max(1, available_cores() // local_world - 1)


@dataclass
class TrainConfig:
    """Everything a run needs; saved (as a plain dict) inside every checkpoint."""
    shards: str
    val_shards: str | None = None
    out: str = "runs/dpm"
    arch: str = "botnet50"
    epochs: int = 40
    max_steps: int | None = None
    batch_size: int = 64  # per process
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 1e-4
    grad_clip: float = 2.0
    restart_epochs: int = 8  # cosine warm restarts: T_0 (epochs), T_mult = 2
    min_lr: float = 1e-4
    workers: int | None = None  # None: default_workers()
    device: str | None = None  # None/"auto": cuda if available; cpu, cuda, cuda:N
    amp: bool | None = None  # None: on for CUDA, off on the CPU
    amp_dtype: str | None = None  # None: bf16 where native, else fp16 with a grad scaler
    channels_last: bool | None = None  # None: on for CUDA
    ranking_weight: float = 0.0
    ranking_margin: float = 0.5
    rank_pairs: str = "group"  # "group" (RankIQA) or "reference" (PINet-style, by pseudo-MOS)
    pseudo_mos: str | None = None  # the full-reference metric that orders "reference" pairs
    regress: tuple[str, ...] = ()  # full-reference metrics regressed as weak labels
    regression_weight: float = 1.0
    resume: bool = False
    input_size: tuple[int, int] = (384, 288)  # (width, height)
    init_weights: str | None = None
    compile: bool = False
    log_every: int = 50
    save_every: int = 1000
    val_every: int = 1  # epochs; the last step always validates
    kadid_root: str | None = None
    seed: int = 0
    allow_incomplete: bool = False
    schedule_every: str = "step"  # the cosine schedule advances every "step" or "epoch"
    protocol: str = "biqa"  # "paper": VIPNet's published recipe, see for_world()

    def validate(self) -> None:
        """Reject bad values before any work starts (no torch needed)."""
        if self.arch not in ARCHS:
            raise ValueError(f"unknown arch {self.arch!r}; choose one of {', '.join(ARCHS)}")
        positive = {"epochs": self.epochs, "batch_size": self.batch_size, "lr": self.lr,
                    "log_every": self.log_every, "save_every": self.save_every,
                    "val_every": self.val_every, "restart_epochs": self.restart_epochs}
        for name, value in positive.items():
            if value <= 0:
                raise ValueError(f"{name} must be positive, got {value}")
        if self.max_steps is not None and self.max_steps <= 0:
            raise ValueError(f"max_steps must be positive, got {self.max_steps}")
        if (self.workers is not None and self.workers < 0) or self.ranking_weight < 0:
            raise ValueError("workers and ranking_weight must be >= 0")
        if len(self.input_size) != 2 or min(self.input_size) < 32:
            raise ValueError(f"input_size must be (width, height) >= 32, got {self.input_size}")
        if self.ranking_weight > 0 and self.batch_size % 2:
            raise ValueError("with ranking the batch holds pairs: batch_size must be even")
        check_device_name(self.device)
        if self.amp_dtype not in (None, *AMP_DTYPES):
            raise ValueError(f"amp_dtype must be one of {AMP_DTYPES}, got {self.amp_dtype!r}")
        if self.rank_pairs not in RANK_PAIRS:
            raise ValueError(f"rank_pairs must be one of {RANK_PAIRS}, got {self.rank_pairs!r}")
        if self.rank_pairs == "reference" and (self.pseudo_mos is None
                                               or self.ranking_weight <= 0):
            raise ValueError("pairs across a reference's types (--rank-pairs reference) are "
                             "ordered by a pseudo-MOS: give --pseudo-mos NAME and a "
                             "--ranking-weight above 0")
        if self.pseudo_mos is not None and self.rank_pairs != "reference":
            raise ValueError("--pseudo-mos orders pairs across types: use it with "
                             "--rank-pairs reference")
        for names in ([self.pseudo_mos] if self.pseudo_mos else [], list(self.regress)):
            if names:
                from biqa.fr_metrics import parse_fr_metrics  # names a known metric?
                if tuple(names) != parse_fr_metrics(",".join(names)):
                    raise ValueError(f"metrics named twice or not as biqa names them: "
                                     f"{', '.join(names)}")
        if self.schedule_every not in ("step", "epoch"):
            raise ValueError(f"schedule_every must be step or epoch, got {self.schedule_every!r}")
        if self.protocol not in PROTOCOLS:
            raise ValueError(f"protocol must be one of {PROTOCOLS}, got {self.protocol!r}")
        if self.regression_weight < 0:
            raise ValueError(f"regression_weight must be >= 0, got {self.regression_weight}")

    @property
    def input_hw(self) -> tuple[int, int]:
        return self.input_size[1], self.input_size[0]

    def for_world(self, world: int) -> "TrainConfig":
        """The configuration a run of ``world`` ranks uses: itself, or under
        ``protocol="paper"`` VIPNet's published recipe (``PAPER``) on top of it."""
        if self.protocol == "biqa":
            return self
        if world > PAPER_GLOBAL_BATCH:
            raise ValueError(f"the paper's global batch of {PAPER_GLOBAL_BATCH} cannot be "
                             f"split over {world} ranks")
        return dataclasses.replace(self, **PAPER, batch_size=PAPER_GLOBAL_BATCH // world)

    def resolved_workers(self) -> int:
        return default_workers() if self.workers is None else self.workers

    def as_dict(self) -> dict:
        plain = dataclasses.asdict(self)
        plain["input_size"] = list(self.input_size)
        plain["regress"] = list(self.regress)
        return plain


PROTOCOLS = ("biqa", "paper")
# VIPNet's pre-training as published (pretraining/multi_gpu_train.py and train_dpm.sh): 40
# epochs, SGD lr 0.05 (momentum 0.9, weight decay 1e-4), clipping at 2, cosine warm restarts
# T_0 = 8, T_mult = 2, eta_min = 1e-4 advanced once per epoch, and 320 images per step over
# all GPUs (each of N ranks takes 320 // N, as its DistributedDataParallel set-up did).
PAPER_GLOBAL_BATCH = 320
PAPER = {"epochs": 40, "lr": 0.05, "momentum": 0.9, "weight_decay": 1e-4, "grad_clip": 2.0,
         "restart_epochs": 8, "min_lr": 1e-4, "schedule_every": "epoch"}

# ``--smoke``: a run that shows the whole pipeline working on a CPU in about a minute.
# 150 steps whatever the shard count; validation (if any) after the last step only.
SMOKE = {"arch": "tiny", "input_size": (128, 96), "batch_size": 32, "epochs": 100_000,
         "max_steps": 150, "lr": 0.05, "log_every": 10, "save_every": 50,
         "restart_epochs": 100_000, "val_every": 100_000}


# ---------------------------------------------------------------------------- fine-tuning
FINETUNE_PROTOCOLS = ("biqa", "paper")
# VIPNet's fine-tuning as published (train.py, configs.py, train.sh, data_loader.py): 35
# epochs with early stopping, exponential LR decay 0.85 per epoch, 12 patches per image
# (16 on KADID-10k, train.sh) at training *and* test, test patches random with random
# flips, PLCC on raw predictions, the best *test* epoch reported.  Adam 5e-4 / 5e-4 and
# batch 32 are biqa's defaults already.
PAPER_FINETUNE = {"epochs": 35, "schedule": "exponential", "early_stopping": True,
                  "test_crops": "random", "logistic": False, "select_on_test": True,
                  "val_fraction": 0.0, "lr": 5e-4, "weight_decay": 5e-4, "batch_size": 32}
PAPER_PATCHES = {"kadid10k": 16}  # train.sh; configs.py's default, 12, elsewhere


@dataclass
class FinetuneConfig:
    """Everything one ``biqa-finetune`` run depends on (saved into results.json)."""

    dataset: str
    root: str | None = None
    out: str = "finetune"
    dpm: str | None = None
    dpm_arch: str = "botnet50"
    cpm_arch: str = "resnet50"
    cpm_weights: str | None = None
    rounds: int = 10
    epochs: int = 20
    patches: int = 12
    patch_size: tuple[int, int] = (384, 288)  # (width, height)
    batch_size: int = 32
    lr: float = 5e-4
    weight_decay: float = 5e-4
    seed: int = 0
    test_fraction: float = 0.2
    val_fraction: float = 0.1
    select_on_test: bool = False
    logistic: bool = True
    cross: dict[str, str | None] = field(default_factory=dict)
    device: str = "auto"
    workers: int = 0
    schedule: str = "cosine"  # or "exponential" (x0.85 per epoch, the paper's)
    early_stopping: bool = False  # the paper's: stop 10 epochs after the best, past half
    test_crops: str = "fixed"  # fixed Halton crops, or "random" crops and flips (the paper's)
    protocol: str = "biqa"  # "paper": VIPNet's published protocol, see resolved()

    def resolved(self) -> "FinetuneConfig":
        """The settings a run uses: itself, or under ``protocol="paper"`` the published
        ones (``PAPER_FINETUNE``) on top of it."""
        if self.protocol == "biqa":
            return self
        return dataclasses.replace(self, **PAPER_FINETUNE,
                                   patches=PAPER_PATCHES.get(self.dataset, 12))

    def check(self) -> None:
        """Refuse settings that cannot run, before any data is read."""
        if self.protocol not in FINETUNE_PROTOCOLS:
            raise ValueError(f"protocol must be one of {FINETUNE_PROTOCOLS}, got "
                             f"{self.protocol!r}")
        if self.rounds < 1 or self.epochs < 1 or self.patches < 1 or self.batch_size < 1:
            raise ValueError("rounds, epochs, patches and batch size must all be >= 1")
        if min(self.patch_size) < 16:
            raise ValueError(f"patch size {self.patch_size} is too small (minimum 16x16)")
        if not 0 < self.test_fraction < 1 or not 0 <= self.val_fraction < 1:
            raise ValueError("test fraction must be in (0, 1) and validation fraction in [0, 1)")
        if self.select_on_test is False and self.val_fraction == 0:
            raise ValueError("without a validation part the epoch can only be picked on the "
                             "test part: pass --select-on-test to do that knowingly")
        if self.schedule not in ("cosine", "exponential"):
            raise ValueError(f"schedule must be cosine or exponential, got {self.schedule!r}")
        if self.test_crops not in ("fixed", "random"):
            raise ValueError(f"test_crops must be fixed or random, got {self.test_crops!r}")
        check_device_name(self.device)

    def as_dict(self) -> dict:
        plain = dataclasses.asdict(self)
        plain["patch_size"] = list(self.patch_size)
        return plain
