"""A run's data: both splits of cfg.datasets tokenised, and checked row by row (label masks, enough
rows for one batch) before any model loads or any run directory exists."""

from omegaconf import OmegaConf

from preference_datasets import DataError
from training.sources import has_rejected_answers
from training.tokenization import load_split, mask_audit
from utils import is_main, main_process_first


def load_data(cfg, tokenizer, pairs, eot_token=None):
    """(train, eval) TokenizedData of cfg.datasets (eval cut to n_eval_examples); rank 0 first, so the
    other ranks find the datasets cache warm. pairs: keep the rejected answers (the loss needs them)."""
    kw = dict(tokenizer=tokenizer, max_length=cfg.max_length, max_prompt_length=cfg.max_prompt_length, pairs=pairs,
              dataset_paths=OmegaConf.to_container(cfg.dataset_paths) if cfg.dataset_paths else None,
              eot_token=eot_token, min_answer_tokens=cfg.min_answer_tokens, num_proc=cfg.num_proc,
              log=print if is_main() else None)
    with main_process_first():  # rank 0 reads and tokenises into the cache; the others then map its files
        train = load_split(cfg.datasets, "train", **kw, rows_per_dataset=cfg.rows_per_dataset, seed=cfg.seed)
        evals = load_eval_split(cfg.datasets, kw)
    if cfg.n_eval_examples is not None and len(evals) > cfg.n_eval_examples:
        evals = evals.first(cfg.n_eval_examples)
    return train, evals


def load_eval_split(datasets, kw):
    """The held-out rows, with their rejected answers whenever every dataset's test rows have one
    (whatever the loss), so that every method's evaluation reports the same preference metrics
    (margin, pref_accuracy). Decided before loading: preference_datasets.has_rejected_answers (the
    registry, or the rows of a file of your own)."""
    pairs = kw["pairs"] or all(has_rejected_answers(name, "test", kw["dataset_paths"]) for name in datasets)
    return load_split(datasets, "test", **{**kw, "pairs": pairs})


def check_data(cfg, tokenizer, eot_token, train_data, eval_data):
    """Refuse, before any model loads and before the run dir exists, a run that cannot take one
    optimizer step or whose label masks are wrong (preference_datasets.mask_audit); returns the
    mask audit of one training row, to print."""
    if len(train_data) < cfg.batch_size:
        raise DataError(f"datasets={list(cfg.datasets)} have {len(train_data)} training rows, fewer than one batch "
                        f"(batch_size={cfg.batch_size}); lower batch_size or add rows")
    mask_audit(eval_data, tokenizer, eot_token)
    return mask_audit(train_data, tokenizer, eot_token)
