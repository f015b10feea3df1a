"""A run's data: both splits of cfg.datasets tokenised, and checked row by row (label masks, enough
rows for one batch) before any model loads or any run directory exists."""

from omegaconf import OmegaConf

from preference_datasets import DataError
from training.sources import has_rejected_answers, source_identity
from training.tokenization import load_split, mask_audit
from utils import broadcast_object, is_main, node_first


def load_data(cfg, tokenizer, pairs, eot_token=None):
    """(train, eval) TokenizedData of cfg.datasets (eval cut to n_eval_examples). What keys the cache
    (each dataset's source identity, with its hub commit; whether the eval rows keep their rejected
    answers) is decided on rank 0 and broadcast, so every rank of every node keys the same entries;
    then they are built once per node (utils.node_first: rank 0, then each other node's first rank
    if its datasets cache lacks them), and the other ranks map them. pairs: keep the rejected answers
    (the loss needs them)."""
    dataset_paths = OmegaConf.to_container(cfg.dataset_paths) if cfg.dataset_paths else None
    identities, eval_pairs = broadcast_object(
        ({name: source_identity(name, dataset_paths) for name in cfg.datasets},
         eval_pairs_of(cfg.datasets, pairs, dataset_paths)) if is_main() else None)
    kw = dict(tokenizer=tokenizer, max_length=cfg.max_length, max_prompt_length=cfg.max_prompt_length, pairs=pairs,
              dataset_paths=dataset_paths, eot_token=eot_token, min_answer_tokens=cfg.min_answer_tokens,
              num_proc=cfg.num_proc, log=print if is_main() else None, identities=identities)
    with node_first():
        train = load_split(cfg.datasets, "train", **kw, rows_per_dataset=cfg.rows_per_dataset, seed=cfg.seed)
        evals = load_split(cfg.datasets, "test", **{**kw, "pairs": eval_pairs})
    if cfg.n_eval_examples is not None and len(evals) > cfg.n_eval_examples:
        evals = evals.first(cfg.n_eval_examples)
    return train, evals


def eval_pairs_of(datasets, pairs, dataset_paths):
    """Whether the held-out rows keep their rejected answers: whenever every dataset's test rows have
    one (whatever the loss), so that every method's evaluation reports the same preference metrics
    (margin, pref_accuracy). Decided before loading: preference_datasets.has_rejected_answers (the
    registry, or the rows of a file of your own)."""
    return pairs or all(has_rejected_answers(name, "test", dataset_paths) for name in datasets)


def check_data(cfg, tokenizer, eot_token, train_data, eval_data):
    """Refuse, before any model loads and before the run dir exists, a run that cannot take one
    optimizer step or whose label masks are wrong (preference_datasets.mask_audit); returns the
    mask audit of one training row, to print."""
    if len(train_data) < cfg.batch_size:
        raise DataError(f"datasets={list(cfg.datasets)} have {len(train_data)} training rows, fewer than one batch "
                        f"(batch_size={cfg.batch_size}); lower batch_size or add rows")
    mask_audit(eval_data, tokenizer, eot_token)
    return mask_audit(train_data, tokenizer, eot_token)
