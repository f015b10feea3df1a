#!/usr/bin/env python
"""Build the tiny randomly initialised Mistral model + tokenizer in models/tiny-mistral/.

Run from the repo root (after scripts/make_sample_data.py):  python -m scripts.make_tiny_model

Tokenizer (trained here with the `tokenizers` library on the text of data/, deterministic):
  * byte-level BPE, target vocab 1024 (smaller if the corpus runs out of merges);
  * pre-tokenizer = GPT-2 style regex split, except that every digit is its own piece
    (`` ?\\p{N}`` instead of `` ?\\p{N}+``), then byte-level mapping; so "12" -> "1", "2"
    and " 7" -> "Ġ7": one token per digit, which makes sums / sorting learnable;
  * special tokens: <unk>=0, <s>=1 (bos), </s>=2 (eos), <pad>=3 (pad, distinct from eos);
  * the chat role markers (<|user|>, <|assistant|>, <|system|>) and hh's "Human:" /
    "Assistant:" are ordinary text (the BPE usually learns them as a few merged tokens);
  * NO bos/eos is added automatically: add_bos_token=False / add_eos_token=False and the
    post-processor is a no-op template ("$A"). The data pipeline adds bos/eos itself;
  * padding_side="right", model_max_length=2048;
  * chat template = the HuggingFaceH4/zephyr one: each message renders as
    '<|user|>\\n' / '<|system|>\\n' / '<|assistant|>\\n' + content + eos_token + '\\n', and
    add_generation_prompt appends '<|assistant|>\\n'.

Model: MistralForCausalLM (MistralDecoderLayer, GQA attention, RMSNorm, rotary embeddings),
random init from a fixed seed, float32 safetensors, untied embeddings like Mistral-7B:
hidden 128, 4 layers, 4 heads / 2 kv heads, intermediate 344, max_position_embeddings 2048.
"""

import argparse
import glob
import json
import os
import shutil

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (AutoModelForCausalLM, AutoTokenizer, GenerationConfig, MistralConfig, MistralForCausalLM,
                          PreTrainedTokenizerFast)

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>"]

# HuggingFaceH4/zephyr-7b-beta style chat template.
CHAT_TEMPLATE = (
    "{% for message in messages %}\n"
    "{% if message['role'] == 'user' %}\n"
    "{{ '<|user|>\n' + message['content'] + eos_token }}\n"
    "{% elif message['role'] == 'system' %}\n"
    "{{ '<|system|>\n' + message['content'] + eos_token }}\n"
    "{% elif message['role'] == 'assistant' %}\n"
    "{{ '<|assistant|>\n'  + message['content'] + eos_token }}\n"
    "{% endif %}\n"
    "{% if loop.last and add_generation_prompt %}\n"
    "{{ '<|assistant|>' }}\n"
    "{% endif %}\n"
    "{% endfor %}"
)

# GPT-2 split regex with single digits.
SPLIT_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


def _render_zephyr(messages, eos="</s>"):
    return "".join(f"<|{m['role']}|>\n{m['content']}{eos}\n" for m in messages)


def corpus(data_dir):
    """Yield all text of the sample data, with the chat template applied to chats."""
    for path in sorted(glob.glob(os.path.join(data_dir, "**", "*.jsonl"), recursive=True)):
        with open(path, encoding="utf-8") as f:
            for line in f:
                row = json.loads(line)
                for key, val in row.items():
                    if isinstance(val, list) and val and isinstance(val[0], dict):
                        yield _render_zephyr(val) + "<|assistant|>\n"
                    elif isinstance(val, str) and key not in ("prompt_id", "post_id", "domain") \
                            and not key.startswith("c_root_id"):
                        yield val


def build_tokenizer(data_dir, vocab_size):
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus(data_dir), trainer=trainer)
    assert [tok.token_to_id(t) for t in SPECIAL_TOKENS] == [0, 1, 2, 3]
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        add_bos_token=False,
        add_eos_token=False,
        padding_side="right",
        model_max_length=2048,
        chat_template=CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False,
    )


def build_model(tokenizer, seed, hidden, layers, heads, kv_heads, intermediate):
    config = MistralConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=hidden // heads,
        hidden_act="silu",
        max_position_embeddings=2048,
        initializer_range=0.02,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        sliding_window=None,
        attention_dropout=0.0,
        tie_word_embeddings=False,
        use_cache=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = MistralForCausalLM(config).to(torch.float32)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return model


def smoke_test(out_dir):
    tok = AutoTokenizer.from_pretrained(out_dir)
    model = AutoModelForCausalLM.from_pretrained(out_dir)
    assert type(model).__name__ == "MistralForCausalLM"
    chat = [{"role": "user", "content": "What is 3 + 4?"}]
    text = tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    assert text == "<|user|>\nWhat is 3 + 4?</s>\n<|assistant|>\n", repr(text)
    ids = tok(text, add_special_tokens=True, return_tensors="pt")
    assert ids.input_ids[0, 0].item() != tok.bos_token_id, "tokenizer must not add bos itself"
    assert [tok.decode([i]) for i in tok("12345").input_ids] == list("12345")
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=5, do_sample=False)
    n_params = sum(p.numel() for p in model.parameters())
    size = sum(os.path.getsize(os.path.join(out_dir, f)) for f in os.listdir(out_dir))
    print(f"tokenizer: {type(tok).__name__}, {len(tok)} tokens; bos/eos/pad/unk = "
          f"{tok.bos_token_id}/{tok.eos_token_id}/{tok.pad_token_id}/{tok.unk_token_id}")
    print(f"example: {tok.convert_ids_to_tokens(ids.input_ids[0])}")
    print(f"model: {n_params:,} params, dir {size / 2**20:.2f} MiB; "
          f"generate ok: {tok.decode(out[0, ids.input_ids.shape[1]:])!r}")


def main():
    ap = argparse.ArgumentParser(description="Build models/tiny-mistral")
    ap.add_argument("--data", default="data")
    ap.add_argument("--out", default="models/tiny-mistral")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--vocab-size", type=int, default=1024)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--intermediate", type=int, default=344)
    args = ap.parse_args()

    tokenizer = build_tokenizer(args.data, args.vocab_size)
    model = build_model(tokenizer, args.seed, args.hidden, args.layers, args.heads,
                        args.kv_heads, args.intermediate)
    if os.path.isdir(args.out):
        shutil.rmtree(args.out)
    os.makedirs(args.out)
    tokenizer.save_pretrained(args.out)
    model.save_pretrained(args.out, safe_serialization=True)
    print(f"saved to {args.out}: {sorted(os.listdir(args.out))}")
    smoke_test(args.out)


if __name__ == "__main__":
    main()
