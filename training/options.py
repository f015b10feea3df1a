"""Config keys declared once, as dataclass fields: default, allowed values or range, and the comment
the YAML file shows. `check` validates a config section against its dataclass and `unknown_key`
names a key no declaration has; training/config_schema.py writes the YAML files from the same fields.

    @dataclass
    class Wandb:
        mode: str = option("offline", "online | offline | disabled", choices=("online", "offline", "disabled"))

The field's annotation gives its kind: bool, int, float (an int is accepted), str, list, a nested
declaration (another dataclass), or Optional[...] of one of these (null allowed).
"""

import dataclasses
import difflib
import typing
from collections.abc import Mapping

from utils import ConfigError

MISSING = dataclasses.MISSING


def option(default, comment, *, choices=None, low=None, high=None, low_open=False, high_open=False, before=None):
    """A declared config key. comment: what the YAML shows after the key ("\\n" starts a continuation
    line). choices: the allowed values (None among them if null is allowed). low/high: the range of a
    number, closed unless low_open/high_open; high may name another key of the same section (its value
    is the bound). before: a comment line the YAML shows above the key."""
    meta = dict(comment=comment, choices=choices, low=low, high=high, low_open=low_open, high_open=high_open,
                before=before)
    if isinstance(default, (list, dict)) or dataclasses.is_dataclass(default):
        factory = (lambda: type(default)(default)) if isinstance(default, (list, dict)) else type(default)
        return dataclasses.field(default_factory=factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def default_of(field):
    return field.default_factory() if field.default_factory is not MISSING else field.default


def _kind(annotation):
    """(base type, optional) of a field's annotation."""
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) is typing.Union and type(None) in args:
        return next(a for a in args if a is not type(None)), True
    return typing.get_origin(annotation) or annotation, False


# Names users bring from other trainers (Hugging Face TrainingArguments, TRL, Axolotl) -> what to write
# here, with what differs in meaning.
ALIASES = {
    "learning_rate": "lr", "lr_rate": "lr", "learningrate": "lr",
    "num_train_epochs": "n_epochs", "num_epochs": "n_epochs", "epochs": "n_epochs",
    "per_device_train_batch_size": "batch_size (the GLOBAL batch, over all ranks and accumulation steps)",
    "train_batch_size": "batch_size", "micro_batch_size": "batch_size and gradient_accumulation_steps",
    "per_device_eval_batch_size": "eval_batch_size (global)",
    "gradient_accumulation": "gradient_accumulation_steps",
    "max_steps": "n_examples (training examples: steps × batch_size)",
    "lr_scheduler_type": "lr_schedule", "scheduler": "lr_schedule", "warmup": "warmup_steps",
    "output_dir": "run_dir", "model_name_or_path": "model.name_or_path", "model_name": "model.name_or_path",
    "dataset": "datasets", "dataset_name": "datasets", "max_seq_length": "max_length", "max_seq_len": "max_length",
    "max_prompt_len": "max_prompt_length", "resume_from_checkpoint": "resume_from",
    "save_steps": "save_every (training examples, not steps)", "eval_steps": "eval_every (training examples)",
    "gradient_checkpointing": "activation_checkpointing", "bf16": "model.policy_dtype=bfloat16",
    "fp16": "model.policy_dtype=float16", "optim": "optimizer", "clip_grad_norm": "max_grad_norm",
}


def unknown_key(key, allowed, where, sections=None):
    """A ConfigError naming `key`, the closest allowed key (or the key other trainers' name stands
    for, ALIASES, or the key of another section it is short for: sections maps `policy_dtype` to
    `model.policy_dtype`) and all of them."""
    name = key.rpartition(".")[2]
    close = ([ALIASES[name.lower()]] if name.lower() in ALIASES else [sections[name]] if name in (sections or ())
             else difflib.get_close_matches(name, list(allowed), n=1))
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return ConfigError(f"unknown config key '{key}'{hint}; keys {where}: {', '.join(sorted(allowed)) or 'none'}")


def check(values, declaration, prefix="", where=None, ignore=()):
    """Raise ConfigError for the first key of `values` (a mapping) that `declaration` (a dataclass)
    lacks, that is missing, or whose value is impossible. Nested declarations are checked in turn.
    prefix: the section's dotted name ("loss." ...), used in messages. ignore: keys checked elsewhere."""
    fields = {f.name: f for f in dataclasses.fields(declaration)}
    for key in values:
        if key not in fields and key not in ignore:
            raise unknown_key(prefix + key, fields, where or (f"in {prefix[:-1]}" if prefix else "at the top level"))
    hints = typing.get_type_hints(declaration)
    for name, field in fields.items():
        if name not in values:
            raise ConfigError(f"config key '{prefix}{name}' is missing")
        base, optional = _kind(hints[name])
        if dataclasses.is_dataclass(base):
            if not isinstance(values[name], Mapping):
                raise ConfigError(f"{prefix}{name} must be a section of keys, got {values[name]!r}")
            check(values[name], base, f"{prefix}{name}.")
        else:
            _check_value(f"{prefix}{name}", values[name], base, optional, field.metadata, values)


def _check_value(key, value, base, optional, meta, section):
    if meta["choices"] is not None or base is bool:
        allowed = meta["choices"] if meta["choices"] is not None else (True, False)
        if value not in allowed or (isinstance(value, bool) != any(isinstance(a, bool) for a in allowed)):
            raise ConfigError(f"{key}={value!r} is not allowed; choose one of {', '.join(map(str, allowed))}")
        return
    if value is None and optional:
        return
    if base in (int, float):
        integer = base is int
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and not isinstance(value, int)):
            raise ConfigError(f"{key} must be {'an integer' if integer else 'a number'}, got {value!r}")
        low, high, bound_key = meta["low"], meta["high"], None
        if isinstance(high, str):  # another key of the section bounds this one
            bound_key, high = key[:len(key) - len(key.rpartition(".")[2])] + high, section.get(high)
        high = high if isinstance(high, (int, float)) and not isinstance(high, bool) else None
        lo_ok = low is None or (value > low if meta["low_open"] else value >= low)
        hi_ok = high is None or (value < high if meta["high_open"] else value <= high)
        if lo_ok and not hi_ok and bound_key is not None:  # either key may be the one mistyped: name both
            raise ConfigError(f"{bound_key}={high} is below {key}={value}; raise {bound_key} or lower {key}")
        if not (lo_ok and hi_ok):
            lo = "(-inf" if low is None else f"{'(' if meta['low_open'] else '['}{low}"
            hi = "inf)" if high is None else f"{high}{')' if meta['high_open'] else ']'}"
            raise ConfigError(f"{key}={value} is out of range: allowed {lo}, {hi}")
    elif base is str and not isinstance(value, str):
        raise ConfigError(f"{key} must be a string, got {value!r}")
    elif base is list and not (isinstance(value, typing.Sequence) and not isinstance(value, str) and len(value)):
        raise ConfigError(f"{key} must be a non-empty list like [a, b], got {value!r}")
