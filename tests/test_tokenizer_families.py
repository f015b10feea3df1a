"""Exact token boundaries for the four tokenizer families (tests/tokenizer_families.py): over every
row of every bundled sample dataset, the prompt + answer ids are the whole chat's tokenisation cut
after the end-of-turn token, the prompt is exactly what inference tokenises, the end-of-turn token
is the last target, truncation keeps all of that, and a short training run of a tiny model with the
family's tokenizer goes through end to end, its greedy samples stopping at the end of the turn."""

import json

import pytest
import torch
from omegaconf import OmegaConf

import preference_datasets as pd
from training import modeling, pipeline, sources, tokenization

from conftest import make_cfg
from tokenizer_families import FAMILIES, build_model_dir

DATASETS = ("ultrachat", "ultrafeedback", "hh", "shp", "orca")
END_OF_TURN = {"byte_level": "</s>", "metaspace": "</s>", "chatml": "<|im_end|>", "llama3": "<|eot_id|>"}


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory):
    """family -> (directory with its tokenizer and tiny model, decoder block class name)."""
    root = tmp_path_factory.mktemp("families")
    return {f: (root / f, build_model_dir(f, root / f)) for f in FAMILIES}


def _tokenizer(family_dirs, family):
    from transformers import AutoTokenizer
    return tokenization.ensure_chat_template(AutoTokenizer.from_pretrained(str(family_dirs[family][0])))


def _sample_chats():
    """(prompt messages, answer) of every chosen and rejected answer of every sample dataset."""
    return [(row["prompt"], answer) for name in DATASETS for split in ("train", "test")
            for row in sources.load_normalised(name + "_sample", split) for answer in (row["chosen"], row["rejected"])
            if answer is not None]


@pytest.mark.integration
@pytest.mark.parametrize("family", FAMILIES)
def test_the_end_of_turn_token_is_what_the_template_emits_after_an_answer(family_dirs, family):
    tok = _tokenizer(family_dirs, family)
    assert tokenization.end_of_turn_token(tok) == END_OF_TURN[family]
    assert tokenization.end_of_turn_token(tok, tok.eos_token) == tok.eos_token  # model.eot_token overrides
    with pytest.raises(pd.DataError, match="is not a single token"):
        tokenization.end_of_turn_token(tok, "<not one token>")


@pytest.mark.integration
@pytest.mark.parametrize("family", FAMILIES)
def test_every_sample_row_splits_the_whole_chat_tokenisation_exactly(family_dirs, family):
    """The reference is the chat rendered and tokenised in one piece, as at inference (bos first when
    the tokenizer has one and the template does not emit it), and the prompt tokenised alone with
    the generation prompt."""
    tok = _tokenizer(family_dirs, family)
    eot = END_OF_TURN[family]
    eot_id = tok.convert_tokens_to_ids(eot)
    chats = _sample_chats()
    texts = [tok.apply_chat_template(p + [{"role": "assistant", "content": a}], tokenize=False) for p, a in chats]
    prompts = [tok.apply_chat_template(p, tokenize=False, add_generation_prompt=True) for p, _ in chats]
    bos = [tok.bos_token_id] if tok.bos_token_id is not None and not texts[0].startswith(tok.bos_token) else []
    wholes = [bos + ids for ids in tok(texts, add_special_tokens=False)["input_ids"]]
    inference_prompts = [bos + ids for ids in tok(prompts, add_special_tokens=False)["input_ids"]]
    for (prompt, answer), text, whole, inference_prompt in zip(chats, texts, wholes, inference_prompts):
        prompt_ids, answer_ids = tokenization.encode_chat(tok, prompt, answer, eot)
        n = len(prompt_ids) + len(answer_ids)
        assert prompt_ids + answer_ids == whole[:n]                          # one tokenisation, cut
        assert prompt_ids == inference_prompt                                # no answer token in the prompt
        assert answer_ids[-1] == eot_id and eot_id not in answer_ids[:-1]  # the end of turn ends the targets
        assert tok.decode(whole[n - 1:]) == text[text.rindex(eot):]         # after it: template text only
    assert len(chats) > 8000


@pytest.mark.integration
@pytest.mark.parametrize("family", FAMILIES)
def test_truncation_keeps_bos_the_prompt_end_and_the_end_of_turn_token(family_dirs, family):
    tok = _tokenizer(family_dirs, family)
    eot_id = tok.convert_tokens_to_ids(END_OF_TURN[family])
    cut_prompts = cut_answers = 0
    for name in DATASETS:
        pairs = name != "ultrachat"
        full = tokenization.load_split([name + "_sample"], "test", tok, 4096, 4096, pairs)
        cut = tokenization.load_split([name + "_sample"], "test", tok, 32, 28, pairs, min_answer_tokens=2)  # answers: <= 8 tokens
        assert len(cut) == len(full)
        sides = [("chosen_ids", full.chosen_ids)] + ([("rejected_ids", full.rejected_ids)] if pairs else [])
        for i in range(len(full)):
            p, q = full.prompt_ids[i], cut.prompt_ids[i]
            # the first token (bos, or the template's first) and the end of the prompt survive
            assert q[0] == p[0] and q[1:] == p[len(p) - len(q) + 1:]
            cut_prompts += len(q) < len(p)
            for side, answers in sides:
                a, b = answers[i], getattr(cut, side)[i]
                assert len(q) + len(b) <= 32 and len(b) >= 1
                assert b[-1] == eot_id and b[:-1] == a[:len(b) - 1]  # a prefix of the answer, then eot
                assert b == a or len(b) < len(a)
                cut_answers += len(b) < len(a)
    assert cut_prompts > 0 and cut_answers > 0  # both cuts happened


@pytest.mark.integration
@pytest.mark.parametrize("family", FAMILIES)
def test_a_short_training_run_works_end_to_end(family_dirs, family, tmp_path, capsys):
    directory, block = family_dirs[family]
    run_dir = tmp_path / "run"
    cfg = make_cfg(f"run_dir={run_dir}", f"model.name_or_path={directory}", f"model.block_name={block}",
                   "datasets=[ultrafeedback_sample]", "max_length=128", "max_prompt_length=64", "batch_size=8",
                   "n_examples=16", "eval_batch_size=8", "n_eval_examples=8", "eval_every=16", "warmup_steps=0",
                   "n_samples=2", "max_new_tokens=4")
    pipeline.validate_config(cfg)
    pipeline.run(OmegaConf.to_container(cfg, resolve=True))
    out = capsys.readouterr().out
    eot = END_OF_TURN[family]
    assert f"answers end with the end-of-turn token {eot!r}" in out and "target: [" in out
    rows = [json.loads(line) for line in open(run_dir / "metrics.jsonl")]
    assert [r["step"] for r in rows if r["split"] == "train"] == [1, 2]
    assert all(r["loss"] == r["loss"] for r in rows)
    generation = json.loads((run_dir / "final" / "generation_config.json").read_text())
    tok = _tokenizer(family_dirs, family)
    assert generation["eos_token_id"][0] == tok.convert_tokens_to_ids(eot)
    assert tok.eos_token_id in generation["eos_token_id"]
    assert len(open(run_dir / "samples.jsonl").readlines()) == 2


@pytest.mark.integration
@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_samples_stop_at_the_end_of_turn_token(family_dirs, family):
    """A model rigged to answer one token x and then the end-of-turn token, and x again after that:
    its greedy answer is 'x' only if generation stops at the end of the turn."""
    from transformers import AutoModelForCausalLM

    tok = _tokenizer(family_dirs, family)
    model = AutoModelForCausalLM.from_pretrained(str(family_dirs[family][0]))
    modeling.stop_at_end_of_turn(model, tok, END_OF_TURN[family])
    data = tokenization.tokenize_rows([{"prompt": [{"role": "user", "content": "Say x."}], "chosen": "x", "rejected": None}],
                            tok, 64, 32, pairs=False)
    last, x, eot = data.prompt_ids[0][-1], data.chosen_ids[0][0], tok.convert_tokens_to_ids(END_OF_TURN[family])
    with torch.no_grad():
        for layer in model.model.layers:  # each block adds nothing: the logits see only the current token
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        emb, head = model.get_input_embeddings().weight, model.lm_head.weight
        emb.zero_(), head.zero_()
        emb[last, 0] = emb[eot, 0] = 1.0  # after the prompt, and after eot: x
        emb[x, 1] = 1.0                   # after x: eot
        head[x, 0] = head[eot, 1] = 10.0
    samples = modeling.greedy_samples(model, tok, data, 1, 8, torch.device("cpu"))
    assert samples[0]["answer"] == "x" and samples[0]["exact"]


def _straddling_tokenizer():
    """Characters as tokens plus one merge, '\\n' + 'T', so the first token of an answer starting with
    'T' also holds the newline that ends the Zephyr generation prompt '<|assistant|>\\n'."""
    from tokenizers import AddedToken, Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    chars = sorted(set(map(chr, range(32, 127))) | {"\n"})
    vocab = {t: i for i, t in enumerate(["<s>", "</s>"] + chars + ["\nT"])}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[("\n", "T")]))
    backend.add_special_tokens([AddedToken("<s>", special=True), AddedToken("</s>", special=True)])
    return tokenization.ensure_chat_template(PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>",
                                                           eos_token="</s>"))


@pytest.mark.unit
def test_a_token_straddling_the_answer_boundary_is_a_target_and_pairs_share_the_common_prompt():
    tok = _straddling_tokenizer()
    prompt = [{"role": "user", "content": "Hi."}]
    p, a = tokenization.encode_chat(tok, prompt, "The end.")
    assert tok.convert_ids_to_tokens(p)[-2:] == ["|", ">"]  # the prompt stops before the straddling token
    assert tok.convert_ids_to_tokens(a) == ["\nT", "h", "e", " ", "e", "n", "d", ".", "</s>"]
    # the rejected answer starts without the merge: the pair shares the common prefix of both prompts
    # and the rejected side's extra prompt token ('\n') becomes its first target
    shared, (chosen, rejected) = tokenization.encode_row(tok, prompt, ["The end.", "No."], "</s>")
    assert shared == p and chosen == a
    assert tok.convert_ids_to_tokens(rejected) == ["\n", "N", "o", ".", "</s>"]
