"""Offline stand-ins for the tokenizer families of the models users train, built with the
`tokenizers` library from the text of the bundled sample data (no hub here), each saved with a tiny
randomly initialised model sized to its vocabulary, in a directory `from_pretrained` loads:

- byte_level: the bundled tokenizer of models/tiny-mistral (GPT-2-style byte-level BPE, <s>/</s>,
  the Zephyr chat template), with a MistralForCausalLM.
- metaspace: Llama/Mistral style: '▁' for spaces, prepended to the text's first word only, no split
  on whitespace when encoding, byte fallback (<0x00>..<0xFF>; '\\n' is only a byte token, as in
  Llama), <unk>/<s>/</s>, bos added by the post-processor, and NO chat template (the Zephyr
  fallback applies, ending turns with </s>). MistralForCausalLM.
- chatml: Qwen2 style: byte-level BPE with Qwen2's split regex, <|endoftext|> (eos and pad), no
  bos, <|im_start|>/<|im_end|> and the ChatML template (a default system turn). Qwen2ForCausalLM.
- llama3: Llama-3 style: byte-level BPE with Llama-3's split regex, <|begin_of_text|> (bos),
  <|end_of_text|> (eos), <|start_header_id|>/<|end_header_id|> headers and <|eot_id|>, with the
  Llama-3 template (which emits bos itself and trims each message). LlamaForCausalLM.

The templates are written from the published formats; the vocabularies are small (about 600
merged tokens) so that training the tokenizers takes about a second each.
"""

import glob
import json

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from utils import REPO_DIR

FAMILIES = ("byte_level", "metaspace", "chatml", "llama3")
VOCAB = 600  # merged tokens learned from the sample data

QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
LLAMA3_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim"
    " + '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)


def sample_texts():
    """Every string in the bundled sample data (message contents, prompts, answers)."""
    def strings(value):
        if isinstance(value, str):
            yield value
        elif isinstance(value, list):
            for v in value:
                yield from strings(v)
        elif isinstance(value, dict):
            for v in value.values():
                yield from strings(v)

    for path in sorted(glob.glob(str(REPO_DIR / "data" / "**" / "*.jsonl"), recursive=True)):
        with open(path, encoding="utf-8") as f:
            for line in f:
                yield from strings(json.loads(line))


def _byte_level(split_regex, specials):
    """A byte-level BPE (GPT-2 / Qwen2 / Llama-3 style) trained on the sample text; specials first."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(split_regex), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB + 256 + len(specials), special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(sample_texts(), trainer)
    return tok


def _metaspace():
    """A Llama/Mistral-style BPE: merges learned within '▁'-prefixed words (as sentencepiece learns
    them), then encoding as the converted Llama/Mistral tokenizers do: '▁' for spaces and before the
    first word, the whole text one piece, unknown characters as byte tokens."""
    learner = Tokenizer(models.BPE())
    learner.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    # '\n' stays out of the learned vocabulary, so (as in Llama) it is always the byte token <0x0A>
    texts = (t.replace("\n", " ") for t in sample_texts())
    learner.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=VOCAB, show_progress=False))
    learned = json.loads(learner.to_str())["model"]
    vocab = {t: i for i, t in enumerate(["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)])}
    for token in sorted(learned["vocab"], key=learned["vocab"].get):
        vocab.setdefault(token, len(vocab))
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in learned["merges"]]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in ("<unk>", "<s>", "</s>")])
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", 1)])
    return tok


def build_tokenizer(family):
    """The family's tokenizer, as transformers loads it (a fast tokenizer)."""
    if family == "byte_level":
        return AutoTokenizer.from_pretrained(str(REPO_DIR / "models" / "tiny-mistral"))
    if family == "metaspace":
        return PreTrainedTokenizerFast(tokenizer_object=_metaspace(), bos_token="<s>", eos_token="</s>",
                                      unk_token="<unk>")
    if family == "chatml":
        tok = _byte_level(QWEN2_SPLIT, ["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
        return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                                       chat_template=CHATML_TEMPLATE)
    if family == "llama3":
        tok = _byte_level(LLAMA3_SPLIT, ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
                                         "<|end_header_id|>", "<|eot_id|>"])
        return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|begin_of_text|>",
                                       eos_token="<|end_of_text|>", chat_template=LLAMA3_TEMPLATE)
    raise ValueError(f"unknown family {family!r}; one of {FAMILIES}")


ARCHITECTURES = {"byte_level": "MistralForCausalLM", "metaspace": "MistralForCausalLM",
                 "chatml": "Qwen2ForCausalLM", "llama3": "LlamaForCausalLM"}
BLOCKS = {"MistralForCausalLM": "MistralDecoderLayer", "Qwen2ForCausalLM": "Qwen2DecoderLayer",
          "LlamaForCausalLM": "LlamaDecoderLayer"}


def build_model_dir(family, directory):
    """Save the family's tokenizer and a tiny random model sized to its vocabulary in `directory`.
    Returns the decoder block's class name (model.block_name)."""
    import torch
    import transformers

    tok = build_tokenizer(family)
    arch = ARCHITECTURES[family]
    config_class = getattr(transformers, arch.replace("ForCausalLM", "Config"))
    config = config_class(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=1024,
                          bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                          pad_token_id=tok.pad_token_id, tie_word_embeddings=False)
    torch.manual_seed(0)
    getattr(transformers, arch)(config).save_pretrained(directory)
    tok.save_pretrained(directory)
    return BLOCKS[arch]
