"""Run settings: one dataclass, YAML profiles shipped in ``semiseg/configs``, ``key=value`` overrides.

A config file is a plain list of overrides on top of :class:`Config` (nanoGPT style). It may
name another file with ``base: other.yaml`` to start from. Every field below is a setting the
paper fixes (§4.2, with its value as default) or one it leaves open (marked *choice*).
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .run_dir import atomic_write_text

__all__ = ["Config", "VARIANTS", "atomic_write_text", "load_config", "save_config", "one_line_errors", "source_commit"]

CONFIG_DIR = Path(__file__).parent / "configs"


@dataclass
class Config:
    # --- data -----------------------------------------------------------------------------
    dataset: str = "camvid"            # camvid | cityscapes | voc | gta5 | folder | tiny
    data_root: str | None = None       # default: $SEMISEG_DATA or ./data
    ratio: str = "1/8"                 # labeled fraction; split lists in data/splits/
    split: int = 0                     # which seeded split (0-2)
    base_size: list[int] | None = None  # [W, H] every image is resized to (aspect not kept), then cropped
    crop_size: list[int] = field(default_factory=lambda: [512, 512])  # [W, H] random training crop (ignore-padded)
    eval_size: list[int] | None = None  # [W, H] network input at evaluation (None: native)
    test_split: str | None = None      # also score this split at the end; it is then the headline
    # Semi-supervised domain adaptation (§4.3.2): an extra labeled source domain X_d.
    source_dataset: str | None = None  # §4.3.2: an extra labeled source domain X_d (e.g. gta5)
    source_sequences: list[str] | None = None  # CamVid only: sequences used as source
    target_sequences: list[str] | None = None  # CamVid only: sequences used as target
    # --- model ----------------------------------------------------------------------------
    arch: str = "deeplabv2_r101"      # deeplabv2_r101 | deeplabv3p_r50 | effnet_lite0_dlv3p (CPU)
    pretrained: bool = True           # ImageNet weights for the encoder (offline: EfficientNet-Lite0)
    # --- optimisation (§4.2) --------------------------------------------------------------
    iterations: int = 150_000         # training iterations (§4.2: 150K)
    batch_labeled: int = 5            # labeled images per iteration (all processes together)
    batch_unlabeled: int = 5          # choice: unlabeled images per step (x num_views); official: batch // 2
    lr: float = 2e-4                  # SGD learning rate (§4.2: 2e-4), poly-decayed
    momentum: float = 0.9             # SGD momentum (§4.2)
    weight_decay: float = 5e-4        # choice: the paper does not state it
    poly_power: float = 0.9           # choice: the usual DeepLab poly exponent
    head_lr_mult: float = 1.0         # new layers at this x lr; paper and official code: one rate (1)
    # --- eq. (1) loss weights and their warm-up -------------------------------------------
    lambda_sup: float = 1.0           # eq. (1) weight of L_sup
    lambda_pseudo: float = 1.0        # eq. (1) weight of L_pseudo
    lambda_ent: float = 0.01          # eq. (1) weight of L_ent
    lambda_contr: float = 0.1         # eq. (1) weight of L_contr
    warmup_frac: float = 2_000 / 150_000  # lambda_pseudo = lambda_contr = 0 before this
    warmup_beta: float = 0.05         # choice: the warm-up also lasts until the teacher's mean beta reaches this (0: off)
    # --- method hyper-parameters ----------------------------------------------------------
    tau_start: float = 0.995          # eq. (2) EMA decay, from 0.995 ...
    tau_end: float = 1.0              # ... to 1 during training (linear: choice)
    phi: float = 0.95                 # FQF confidence threshold
    psi: int = 256                    # memory bank vectors per class
    sharpen: float = 6.0              # beta = confidence ** s for L_pseudo
    num_views: int = 2                # A in eq. (6)-(7)
    class_balance: bool = True        # alpha_c = sqrt(f_m / f_c); False -> alpha = 1 (VOC)
    # --- ablation switches (Tables 5-8) ---------------------------------------------------
    bank_from: str = "teacher"        # teacher | student: who fills the memory bank
    attention: bool = True            # S_c weighting in eq. (8); off: all weights 1
    attention_detach: bool = True     # S_c,theta sees p.detach() (official code; paper silent)
    fqf: bool = True                  # Feature Quality Filter for the bank update
    # --- run ------------------------------------------------------------------------------
    variant: str = "full"             # a name in VARIANTS: applies its overrides (see below)
    profile: str = "paper"            # the profile's name, recorded in summaries
    seed: int = 0                     # seeds weights of new layers, data order and augmentation
    eval_with: str = "student"        # student (paper, §4.2) | teacher
    eval_every: int = 0               # also score student and teacher on val every N iterations
    curve_test: bool = False          # at those evaluations also score test_split (curves of issue #20)
    log_every: int = 10               # write a metrics.jsonl record every N iterations
    device: str = "auto"              # auto | cpu | cuda
    threads: int = 0                  # torch.set_num_threads; 0 = leave as is
    checkpoint_every: int = 0         # write a resumable checkpoint every N iterations (0: only at the end)
    keep_checkpoints: int = 2         # how many of those to keep
    deterministic: bool = False       # torch.use_deterministic_algorithms (exact resume on GPU)
    precision: str = "fp32"           # fp32 | bf16 (autocast of the forward passes)
    channels_last: bool = False       # NHWC memory format for the convolutions
    compile: bool = False             # torch.compile the networks' forward passes
    attention_impl: str = "batched"   # batched | loop: S_c as one batched computation, or the per-class loop (same numbers)
    compile_contrastive: bool = False  # torch.compile eq. (8)-(11) and the bank update: fused kernels (issue #13)
    cache_images: bool = False        # keep decoded, resized training images in memory (same numbers)
    sync_bn: bool = False             # torchrun with several CUDA processes: SyncBatchNorm in the network
    out_dir: str | None = None        # default: runs/<dataset>/<ratio>/split<k>/<variant>/seed<k>

    @property
    def warmup_iterations(self) -> int:
        """The fixed part of the warm-up (§4.2): ``warmup_frac`` of the schedule, 2K of 150K in the paper."""
        return round(self.warmup_frac * self.iterations)

    def run_dir(self) -> Path:
        if self.out_dir:
            return Path(self.out_dir)
        return Path("runs") / self.dataset / self.ratio.replace("/", "-") / f"split{self.split}" / self.variant / f"seed{self.seed}"

    def validate(self) -> "Config":
        checks = [
            ("phi", 0.0 < self.phi < 1.0, "must be in (0, 1)"),
            ("psi", self.psi >= 1, "must be >= 1"),
            ("iterations", self.iterations >= 1, "must be >= 1"),
            ("num_views", self.num_views >= 1, "must be >= 1"),
            ("bank_from", self.bank_from in ("teacher", "student"), "must be teacher or student"),
            ("eval_with", self.eval_with in ("teacher", "student"), "must be teacher or student"),
            ("device", self.device in ("auto", "cpu", "cuda"), "must be auto, cpu or cuda"),
            ("precision", self.precision in ("fp32", "bf16"), "must be fp32 or bf16"),
            ("attention_impl", self.attention_impl in ("batched", "loop"), "must be batched or loop"),
            ("compile_contrastive", not (self.compile_contrastive and self.attention_impl == "loop"),
             "needs attention_impl batched (the per-class loop reads class sizes on the host)"),
            ("checkpoint_every", self.checkpoint_every >= 0, "must be >= 0"),
            ("keep_checkpoints", self.keep_checkpoints >= 1, "must be >= 1"),
            ("tau_start", 0.0 <= self.tau_start <= 1.0, "must be in [0, 1]"),
            ("tau_end", 0.0 <= self.tau_end <= 1.0, "must be in [0, 1]"),
            ("warmup_frac", 0.0 <= self.warmup_frac < 1.0, "must be in [0, 1)"),
            ("warmup_beta", 0.0 <= self.warmup_beta < 1.0, "must be in [0, 1)"),
            ("head_lr_mult", self.head_lr_mult > 0, "must be > 0"),
            ("batch_labeled", self.batch_labeled >= 1, "must be >= 1"),
            ("batch_unlabeled", self.batch_unlabeled >= 1, "must be >= 1"),
            ("log_every", self.log_every >= 1, "must be >= 1"),
            ("ratio", _ratio_ok(self.ratio), "must be 1/N with N >= 1, e.g. 1/8"),
            ("crop_size", _size_ok(self.crop_size), "must be [W, H] with two positive integers"),
            ("base_size", self.base_size is None or _size_ok(self.base_size), "must be null or [W, H], positive"),
            ("eval_size", self.eval_size is None or _size_ok(self.eval_size), "must be null or [W, H], positive"),
            ("threads", self.threads >= 0, "must be >= 0"),
            ("eval_every", self.eval_every >= 0, "must be >= 0"),
            ("curve_test", not self.curve_test or (self.eval_every > 0 and bool(self.test_split)),
             "needs eval_every > 0 and a test_split to score"),
            ("variant", self.variant in VARIANTS or "=" in self.variant,
             f"is not a known variant ({', '.join(sorted(VARIANTS))}) nor of the form key=value"),
        ]
        for name in ("lambda_sup", "lambda_pseudo", "lambda_ent", "lambda_contr", "lr", "weight_decay"):
            checks.append((name, getattr(self, name) >= 0, "must be >= 0"))
        for key, ok, why in checks:
            if not ok:
                raise ValueError(f"config key {key!r} = {getattr(self, key)!r}: {why}")
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


FIELDS = {f.name: f for f in dataclasses.fields(Config)}


def describe_keys() -> list[tuple[str, Any, str]]:
    """``(key, default, meaning)`` of every config key, read from the comments of :class:`Config`."""
    import inspect

    meaning = {}
    for line in inspect.getsource(Config).splitlines():
        found = re.match(r"\s{4}(\w+): [^#]*#\s*(.+)$", line)
        if found:
            meaning[found.group(1)] = found.group(2).strip()
    return [(name, getattr(Config(), name), meaning.get(name, "")) for name in FIELDS]


def keys_table() -> str:
    """The config keys as a Markdown table (``python -m semiseg.train --keys``, the train page)."""
    rows = [f"| `{k}` | `{yaml.safe_dump(v, default_flow_style=True).strip().removesuffix('...').strip()}` | "
            f"{m.replace('|', '/')} |" for k, v, m in describe_keys()]
    return "| key | default | meaning |\n|---|---|---|\n" + "\n".join(rows)


def _ratio_ok(ratio) -> bool:
    parts = str(ratio).split("/")
    return len(parts) == 2 and parts[0] == "1" and parts[1].isdigit() and int(parts[1]) >= 1


def _size_ok(size) -> bool:
    return (isinstance(size, list) and len(size) == 2
            and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in size))

# Variant name -> the overrides it stands for. ``variant=X`` applies X's overrides on top of the
# profile; explicit overrides still win. A variant written ``key=value`` (the reproduction grids of
# Tables 6-7, e.g. ``psi=64``) stands for that one override.
VARIANTS: dict[str, dict[str, Any]] = {
    "full": {},                                                                   # eq. (1), all four terms
    "supervised": {"lambda_pseudo": 0.0, "lambda_ent": 0.0, "lambda_contr": 0.0},  # L_sup only
    "no_contr": {"lambda_contr": 0.0},                                            # everything but the bank's loss
    # §4.3.2 demo (profile camvid_da_quick): with the labeled source domain, and without it
    "da_full": {},
    "da_target_only": {"source_dataset": None, "source_sequences": None},
    # issue #4: the same comparison under bf16 autocast + channels_last
    "full_bf16": {"precision": "bf16", "channels_last": True},
    "supervised_bf16": {"lambda_pseudo": 0.0, "lambda_ent": 0.0, "lambda_contr": 0.0, "precision": "bf16",
                        "channels_last": True},
    # Table 5: the loss terms of eq. (1)
    "sup": {"lambda_pseudo": 0.0, "lambda_ent": 0.0, "lambda_contr": 0.0},
    "sup+pseudo": {"lambda_ent": 0.0, "lambda_contr": 0.0},
    "sup+ent": {"lambda_pseudo": 0.0, "lambda_contr": 0.0},
    "sup+contr": {"lambda_pseudo": 0.0, "lambda_ent": 0.0},
    "sup+pseudo+ent": {"lambda_contr": 0.0},
    "sup+pseudo+contr": {"lambda_ent": 0.0},
    "sup+ent+contr": {"lambda_pseudo": 0.0},
    "sup+pseudo+ent+contr": {},
    # Table 8: the bank's components
    "base": {"bank_from": "student", "attention": False, "fqf": False},
    "base+teacher": {"attention": False, "fqf": False},
    "base+attention": {"bank_from": "student", "fqf": False},
    "base+fqf": {"bank_from": "student", "attention": False},
    "all": {},
}


def variant_overrides(variant: str) -> dict[str, Any]:
    """The overrides a variant name stands for; an unknown name is a one-line error."""
    if variant in VARIANTS:
        return dict(VARIANTS[variant])
    if "=" in variant:
        key, value = _split_override(variant)
        return {key: value}
    close = difflib.get_close_matches(variant, VARIANTS, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise KeyError(f"config key 'variant': unknown variant {variant!r}{hint}; known: {', '.join(VARIANTS)}")


def _coerce(key: str, value: Any, where: str) -> Any:
    """Check ``value`` against the type of field ``key``; strings from the command line are parsed as YAML."""
    if key not in FIELDS:
        close = difflib.get_close_matches(key, FIELDS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise KeyError(f"{where}: unknown config key {key!r}{hint}")
    if isinstance(value, str) and FIELDS[key].type != "str":
        value = yaml.safe_load(value) if value != "" else None
    default = getattr(Config(), key)
    kind = type(default)
    if value is None or default is None:
        return value
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if kind is float and isinstance(value, str):  # YAML 1.1 reads 1e-4 as a string
        try:
            return float(value)
        except ValueError:
            pass
    if kind is str and FIELDS[key].type == "str" and not isinstance(value, str):
        return str(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise TypeError(f"{where}: config key {key!r} expects {kind.__name__}, got {value!r}")
    return value


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | dict | None = None) -> Config:
    """Build a :class:`Config` from a YAML file (a path, or a name in ``semiseg/configs``) and overrides."""
    values: dict[str, Any] = {}
    if path is not None:
        values.update(_read_yaml(path))
    cfg = Config()
    for key, value in values.items():
        setattr(cfg, key, _coerce(key, value, str(path)))
    items = list(overrides.items() if isinstance(overrides, dict) else [_split_override(o) for o in overrides or []])
    for key, value in items:  # first pass: find the variant (and check every key)
        setattr(cfg, key, _coerce(key, value, "override"))
    # defaults < profile < the variant's overrides < explicit overrides
    for key, value in variant_overrides(cfg.variant).items():
        setattr(cfg, key, _coerce(key, value, f"variant {cfg.variant!r}"))
    for key, value in items:
        setattr(cfg, key, _coerce(key, value, "override"))
    return cfg.validate()


def _split_override(text: str) -> tuple[str, str]:
    if "=" not in text:
        raise ValueError(f"override {text!r} is not of the form key=value")
    key, value = text.split("=", 1)
    return key.strip(), value


def resolve_config_path(path: str | os.PathLike) -> Path:
    p = Path(path)
    if p.exists():
        return p
    for candidate in (CONFIG_DIR / p, CONFIG_DIR / f"{p}.yaml"):
        if candidate.exists():
            return candidate
    names = ", ".join(sorted(q.stem for q in CONFIG_DIR.glob("*.yaml")))
    raise FileNotFoundError(f"config {str(path)!r} not found (shipped configs: {names})")


def _read_yaml(path: str | os.PathLike, seen: tuple = ()) -> dict[str, Any]:
    p = resolve_config_path(path)
    if p.resolve() in seen:
        chain = " -> ".join(str(s) for s in (*seen, p.resolve()))
        raise ValueError(f"{p}: 'base:' makes a loop ({chain})")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ValueError(f"{p}: not valid YAML{where} ({problem})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{p}: expected a mapping of config keys")
    base = data.pop("base", None)
    if base is None:
        return data
    merged = _read_yaml(p.parent / base if (p.parent / base).exists() else base, (*seen, p.resolve()))
    merged.update(data)
    return merged


def save_config(cfg: Config, path: str | os.PathLike) -> None:
    atomic_write_text(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False))


# Errors a user can cause (bad data, config, checkpoint, device); anything else is a bug and keeps its traceback.
USER_ERRORS = (ValueError, KeyError, TypeError, OSError, RuntimeError, FloatingPointError)


@contextlib.contextmanager
def one_line_errors():
    """Command-line entry points: turn a user error into ``error: <one line>`` and exit status 1."""
    try:
        yield
    except USER_ERRORS as err:
        message = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
        sys.exit("error: " + " ".join(str(message).split()))


def source_commit():
    """Short git commit of the ``semiseg`` source, with ``+dirty`` when the package differs from it
    (``$SEMISEG_COMMIT`` where the checkout travels without ``.git``, as on the GPU machine); None
    outside a git checkout."""
    import subprocess

    if os.environ.get("SEMISEG_COMMIT"):
        return os.environ["SEMISEG_COMMIT"]
    here = Path(__file__).parent
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=here,
                                check=True).stdout.strip()
        dirty = subprocess.run(["git", "diff", "--quiet", "HEAD", "--", "."], cwd=here).returncode != 0
    except (OSError, subprocess.CalledProcessError):
        return None
    return f"{commit}+dirty" if dirty and commit else commit or None
