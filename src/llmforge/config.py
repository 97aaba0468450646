"""Typed recipes: YAML files of stage configs, validated against dataclasses, with dotted overrides.

Every stage owns a plain dataclass of its settings (next to the code that uses them); `Recipe`
composes them. Loading checks every key and type so that a typo in a recipe is a one-line error
that names the key, not a traceback an hour into a run.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from llmforge.align.dpo import DPOConfig
from llmforge.align.grpo import GRPOConfig
from llmforge.align.reward import RewardConfig
from llmforge.align.sft import SFTConfig
from llmforge.compress.distill import DistillConfig
from llmforge.compress.prune import PruneConfig
from llmforge.data.config import DataConfig
from llmforge.eval.evaluate import EvalConfig
from llmforge.model import presets
from llmforge.model.config import ModelConfig
from llmforge.schema import ConfigError, build
from llmforge.tokenizer.bpe import TokenizerConfig
from llmforge.tokenizer.shards import TokenizeConfig
from llmforge.train.device import pick_device
from llmforge.train.loop import TrainConfig


@dataclass
class ExportConfig:
    source: str = "sft"  # which stage's model to export: "sft" or "pretrain"
    dtype: str = "float32"  # float32 | bfloat16 | float16

    def __post_init__(self) -> None:
        if self.source not in ("sft", "pretrain"):
            raise ValueError(f"source: expected sft or pretrain, got {self.source!r}")
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"dtype: expected float32, bfloat16 or float16, got {self.dtype!r}")


@dataclass
class Recipe:
    name: str = "demo"
    run_dir: str = "runs"
    seed: int = 1337
    device: str = "auto"  # auto | cpu | cuda | mps
    stages: list[str] = field(
        default_factory=lambda: [
            "data", "tokenizer", "tokenize", "pretrain", "sft", "eval", "export", "report"
        ]
    )
    data: DataConfig = field(default_factory=DataConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    tokenize: TokenizeConfig = field(default_factory=TokenizeConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    dpo: DPOConfig = field(default_factory=DPOConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    prune: PruneConfig = field(default_factory=PruneConfig)

    @property
    def root(self) -> Path:
        return Path(self.run_dir) / self.name


def load_recipe(path: str | Path | None, overrides: list[str] = ()) -> Recipe:
    """Read a YAML recipe (or start from defaults), apply `a.b=value` overrides, validate."""
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"recipe file not found: {path}")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML{_yaml_problem(e)}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: a recipe must be a mapping of sections")
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} must look like section.key=value")
        try:
            parsed = yaml.safe_load(value) if value else ""
        except yaml.YAMLError as e:
            raise ConfigError(f"{key}: cannot parse value {value!r}{_yaml_problem(e)}") from None
        _set_dotted(raw, key.split("."), parsed)
    if isinstance(raw.get("model"), dict):
        try:
            raw["model"] = presets.resolve(raw["model"])
        except ValueError as e:
            raise ConfigError(f"model.preset: {e}") from None
    return validate(build(Recipe, raw, ""))


def _yaml_problem(e: yaml.YAMLError) -> str:
    """One line from a YAML error: its problem and line, without the multi-line excerpt."""
    mark = getattr(e, "problem_mark", None)
    where = f" at line {mark.line + 1}" if mark else ""
    return f"{where}: {getattr(e, 'problem', None) or e.__class__.__name__}"


def _set_dotted(raw: dict, keys: list[str], value: Any) -> None:
    for k in keys[:-1]:
        node = raw.setdefault(k, {})
        if not isinstance(node, dict):
            raise ConfigError(f"cannot set {'.'.join(keys)}: {k} is not a section")
        raw = node
    raw[keys[-1]] = value


def to_dict(obj: Any) -> Any:
    """Plain data (for YAML, JSON and fingerprints) from dataclasses, nested in dicts or not."""
    if dataclasses.is_dataclass(obj):
        return dataclasses.asdict(obj)
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def validate(recipe: Recipe) -> Recipe:
    """Cross-field checks, run before any stage starts so a bad recipe fails in a second."""
    from llmforge.stages import STAGES

    unknown = [s for s in recipe.stages if s not in STAGES]
    if unknown:
        raise ConfigError(f"stages: unknown stage {unknown[0]!r} (valid: {', '.join(STAGES)})")
    model = recipe.model
    try:
        model.validate(require_vocab=False)
    except ValueError as e:
        raise ConfigError(f"model: {e}") from None
    for section in ("train", "sft.train", "eval"):
        cfg = recipe.sft.train if section == "sft.train" else getattr(recipe, section)
        if section == "sft.train" and recipe.sft.base:
            continue  # a base model brings its own context length
        if cfg.seq_len > model.max_seq_len:
            raise ConfigError(
                f"{section}.seq_len={cfg.seq_len} exceeds model.max_seq_len={model.max_seq_len}"
            )
    try:
        pick_device(recipe.device)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    return recipe
