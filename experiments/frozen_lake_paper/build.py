"""What train.py needs for the paper's Frozen Lake: a word-level tokenizer whose words are grid
states, a Markov policy (a Mistral config with zero decoder layers), and one data folder per map.

- Tokenizer (built here with `tokenizers`, nothing downloaded): the words <pad> <eot> <user>
  <assistant> go and s0 ... s{MAX_STATES-1}, split on spaces. Its chat template renders a chat as
  "<user> go <assistant> s0 s1 ... s24 <eot>", so the prompt is "<user> go <assistant>" and the answer
  is the trajectory: the states from S to G, then the end-of-turn token <eot>.
- Policy: MistralConfig(num_hidden_layers=0): token embedding (a linear map of the one-hot state),
  the final RMSNorm, and the output head (a second linear map). With no attention the logits at a
  position depend on that position's token alone, so the policy is Markov: the paper's two-layer
  network over grid states. It is trained from scratch (model.from_scratch=true: random weights from
  config.json, seeded by the run's seed).
- Data (one folder per map, the ultrafeedback schema train.py reads): train.jsonl and test.jsonl each
  hold the same single row: chosen = the optimal trajectory, rejected = the sub-optimal one.
"""

import json
from pathlib import Path

from experiments.frozen_lake_paper.lake import trajectories

MAX_STATES = 49  # 7x7, the largest map
SPECIALS = ["<pad>", "<eot>", "<user>", "<assistant>"]
PROMPT = "go"
CHAT_TEMPLATE = ("{% for m in messages %}{% if m['role'] == 'user' %}<user> {{ m['content'] }} "
                 "{% else %}<assistant> {{ m['content'] }} <eot>{% endif %}{% endfor %}"
                 "{% if add_generation_prompt %}<assistant> {% endif %}")


def state_token(s):
    return f"s{s}"


def build_model_dir(out, hidden_size=32):
    """Write tokenizer files and config.json of the zero-layer Mistral into `out`; returns out."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import MistralConfig, PreTrainedTokenizerFast

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    words = SPECIALS + [PROMPT] + [state_token(s) for s in range(MAX_STATES)]
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<pad>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="<eot>",
                                  additional_special_tokens=["<user>", "<assistant>"])
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(out)
    config = MistralConfig(vocab_size=len(words), hidden_size=hidden_size, intermediate_size=hidden_size,
                           num_hidden_layers=0, num_attention_heads=1, num_key_value_heads=1,
                           max_position_embeddings=128, tie_word_embeddings=False,
                           pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=None)
    config.save_pretrained(out)
    return out


def trajectory_text(path):
    return " ".join(state_token(s) for s in path)


def write_map_data(out, desc):
    """out/train.jsonl and out/test.jsonl with the map's one (optimal, sub-optimal) row; returns out."""
    best, other = trajectories(desc)
    if other is None:
        raise ValueError(f"map {desc} has no sub-optimal route (see lake.trajectories)")
    user = {"role": "user", "content": PROMPT}
    row = {"prompt": PROMPT, "chosen": [user, {"role": "assistant", "content": trajectory_text(best)}],
           "rejected": [user, {"role": "assistant", "content": trajectory_text(other)}], "map": list(desc)}
    row["messages"] = row["chosen"]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for split in ("train", "test"):
        (out / f"{split}.jsonl").write_text(json.dumps(row) + "\n")
    return out
