"""Answers for judge-based benchmarks (AlpacaEval, Arena-Hard, MT-Bench) from a run's final/, in each
judging tool's own input format: `run_eval.py RUN --generate NAME`.

The prompt is the model's chat template with the generation prompt (bos prepended when the template
does not emit it, as the trainer encodes prompts); an answer ends at the end-of-turn token
(tokenization.end_of_turn_token) or eos, and what follows is cut. Prompts are answered in batches
sorted by length (left padding), greedily unless a temperature is given. The output file is
rewritten atomically after every batch, so a killed run loses at most that batch, and a rerun skips
the prompts it holds. An MT-Bench question's second turn is asked after the model's own first answer.
"""

import hashlib
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from utils import write_atomic


class GenerationError(ValueError):
    """Bad input to --generate (a prompt file, an output of other settings): reported as one line."""


@dataclass(frozen=True)
class Benchmark:
    """Where a benchmark's prompts live on the hub (a file of a dataset repository) and its output."""
    hub_repo: str
    hub_file: str
    suffix: str  # of the default output file: .json (AlpacaEval's list) or .jsonl


BENCHMARKS = {
    "alpaca_eval": Benchmark("tatsu-lab/alpaca_eval", "alpaca_eval.json", ".json"),  # the 805 instructions
    "arena_hard": Benchmark("lmarena-ai/arena-hard-auto", "data/arena-hard-v0.1/question.jsonl", ".jsonl"),
    "mt_bench": Benchmark("HuggingFaceH4/mt_bench_prompts", "raw/question.jsonl", ".jsonl"),  # FastChat's file
}


@dataclass
class Prompt:
    """One benchmark question: its id in the tool's files, its user turns, and the row it came from."""
    id: object
    turns: list
    row: dict = field(repr=False)


@dataclass(frozen=True)
class Settings:
    """How answers are drawn; temperature 0 is greedy (top_p unused). Written into every answer."""
    max_new_tokens: int = 2048
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0

    def as_dict(self):
        if self.temperature == 0:
            return {"do_sample": False, "max_new_tokens": self.max_new_tokens}
        return {"do_sample": True, **asdict(self)}


# ---------------------------------------------------------------- prompts

def fetch_prompts(name):
    """The benchmark's prompt file from the hub (cached by huggingface_hub); offline, a one-line error."""
    from huggingface_hub import hf_hub_download
    bench = BENCHMARKS[name]
    try:
        return Path(hf_hub_download(bench.hub_repo, bench.hub_file, repo_type="dataset"))
    except Exception as e:  # offline mode, no network, a moved file: all end the same way
        raise GenerationError(f"cannot fetch {bench.hub_repo}/{bench.hub_file} from the hub ({type(e).__name__}); "
                              f"download it where the hub is reachable and give it with --prompts FILE") from None


def _rows(path):
    """The rows of a JSON list or a JSONL file, each a dict."""
    text = Path(path).read_text(encoding="utf-8")
    try:
        rows = json.loads(text) if text.lstrip().startswith("[") else \
            [json.loads(line) for line in text.splitlines() if line.strip()]
    except json.JSONDecodeError as e:
        raise GenerationError(f"{path}: not JSON or JSONL ({e})") from None
    bad = next((i for i, r in enumerate(rows) if not isinstance(r, dict)), None)
    if bad is not None:
        raise GenerationError(f"{path}: row {bad} is not an object")
    return rows


def _turns(name, row):
    """The user turns of one row of benchmark `name`'s prompt file; KeyError/TypeError when malformed."""
    if name == "alpaca_eval":
        return [row["instruction"]]
    if name == "arena_hard":  # the current file has 'prompt'; v0.1's old one 'turns': [{"content": ...}]
        return [row["prompt"]] if "prompt" in row else [row["turns"][0]["content"]]
    return list(row["turns"])  # MT-Bench: two strings


def read_prompts(name, path):
    """[Prompt] of benchmark `name` from a local prompt file, checked row by row."""
    id_keys = {"alpaca_eval": ("instruction",), "arena_hard": ("uid", "question_id"), "mt_bench": ("question_id",)}
    prompts, seen = [], set()
    for i, row in enumerate(_rows(path)):
        key = next((k for k in id_keys[name] if k in row), id_keys[name][0])
        try:
            turns = _turns(name, row)
            pid = row[key]
        except (KeyError, IndexError, TypeError) as e:
            raise GenerationError(f"{path}: row {i} has no {e} (a {name} prompt file needs "
                                  f"{' or '.join(id_keys[name])} and its prompt)") from None
        if not turns or not all(isinstance(t, str) and t for t in turns) or (name == "mt_bench" and len(turns) != 2):
            raise GenerationError(f"{path}: row {i} ({key}={pid!r}): the prompt turns {turns!r} are not "
                                  f"{'two' if name == 'mt_bench' else 'one'} non-empty string(s)")
        if pid in seen:
            raise GenerationError(f"{path}: row {i}: {key}={pid!r} appears twice")
        seen.add(pid)
        prompts.append(Prompt(pid, turns, row))
    if not prompts:
        raise GenerationError(f"{path}: no prompts")
    return prompts


# ---------------------------------------------------------------- the tools' formats

def _answer_id(model_id, pid, answers):
    """A stable answer id (the tools draw a random one): a rerun gives the same file."""
    return hashlib.sha1(json.dumps([model_id, pid, answers]).encode()).hexdigest()[:22]


def make_record(name, prompt, answers, model_id, settings):
    """The tool's answer row for `prompt` answered with `answers` (one per user turn)."""
    gen = settings.as_dict()
    if name == "alpaca_eval":
        return {"instruction": prompt.id, "output": answers[0], "generator": model_id,
                "dataset": prompt.row.get("dataset", "alpaca_eval"), "generation": gen}
    if name == "arena_hard" and "uid" in prompt.row:  # arena-hard-auto since v2.0 (April 2025)
        return {"uid": prompt.id, "ans_id": _answer_id(model_id, prompt.id, answers), "model": model_id,
                "messages": [{"role": "user", "content": prompt.turns[0]},
                             {"role": "assistant", "content": {"answer": answers[0]}}],
                "tstamp": time.time(), "generation": gen}
    turns = [{"content": a} for a in answers] if name == "arena_hard" else answers  # old arena-hard / FastChat
    return {"question_id": prompt.id, "answer_id": _answer_id(model_id, prompt.id, answers), "model_id": model_id,
            "choices": [{"index": 0, "turns": turns}], "tstamp": time.time(), "generation": gen}


def record_key(record):
    """(prompt id, model id) of an answer row of any of the formats."""
    for pid, model in (("instruction", "generator"), ("uid", "model"), ("question_id", "model_id")):
        if pid in record:
            return record[pid], record.get(model)
    raise KeyError("instruction, uid or question_id")


def dump(name, records):
    return json.dumps(records, indent=2, ensure_ascii=False) + "\n" if name == "alpaca_eval" else \
        "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)


def load_done(path, model_id, settings):
    """{prompt id: record} already in the output file `path`, which must hold answers of the same
    model and settings (a mix would be judged as one model)."""
    if not path.exists():
        return {}
    done = {}
    for i, record in enumerate(_rows(path)):
        try:
            pid, model = record_key(record)
        except KeyError as e:
            raise GenerationError(f"{path}: row {i} is not an answer of these formats (no {e}): give another "
                                  "--out") from None
        if model != model_id or record.get("generation") != settings.as_dict():
            raise GenerationError(f"{path}: row {i} was generated by {model!r} with {record.get('generation')}, "
                                  f"not {model_id!r} with {settings.as_dict()}: give another --out or remove it")
        done[pid] = record
    return done


# ---------------------------------------------------------------- the model

def load_tokenizer(final):
    """final/'s tokenizer with a chat template (the Zephyr fallback, as the trainer gives base models)."""
    from transformers import AutoTokenizer

    from training.tokenization import ensure_chat_template
    return ensure_chat_template(AutoTokenizer.from_pretrained(str(final)))


def prompt_ids(tokenizer, messages):
    """Token ids of `messages` rendered with the chat template and its generation prompt; bos first
    when the tokenizer has one (the template may emit it already), as the trainer's prompts begin."""
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if tokenizer.bos_token_id is not None and ids[:1] != [tokenizer.bos_token_id]:
        ids = [tokenizer.bos_token_id] + ids
    return ids


class HFGenerator:
    """transformers' generate on a left-padded batch; answers cut at the first stop token."""

    def __init__(self, final, tokenizer, stop_ids, settings, device=None, dtype="auto"):
        import torch
        from transformers import AutoModelForCausalLM
        self.torch, self.tokenizer, self.stop_ids, self.settings = torch, tokenizer, stop_ids, settings
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        kw = {"dtype": dtype if dtype == "auto" else getattr(torch, dtype)}
        if (Path(final) / "adapter_config.json").is_file():  # lora.merge=false: the adapter on its base
            from peft import AutoPeftModelForCausalLM
            self.model = AutoPeftModelForCausalLM.from_pretrained(str(final), **kw)
        else:
            self.model = AutoModelForCausalLM.from_pretrained(str(final), **kw)
        self.model.to(self.device).eval()
        torch.manual_seed(settings.seed)

    def answer(self, conversations):
        """Answers (str, stripped) to a batch of conversations (lists of messages ending with a user turn)."""
        torch, s = self.torch, self.settings
        ids = [prompt_ids(self.tokenizer, m) for m in conversations]
        width = max(map(len, ids))
        pad = self.tokenizer.pad_token_id
        batch = torch.tensor([[pad] * (width - len(x)) + x for x in ids], device=self.device)  # (B, T) left-padded
        mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids], device=self.device)
        sampling = dict(do_sample=True, temperature=s.temperature, top_p=s.top_p) if s.temperature else \
            dict(do_sample=False, temperature=None, top_p=None, top_k=None)
        with torch.no_grad():
            out = self.model.generate(batch, attention_mask=mask, max_new_tokens=s.max_new_tokens, pad_token_id=pad,
                                      eos_token_id=self.stop_ids, **sampling)
        return [self._text(row[width:].tolist()) for row in out]

    def _text(self, new_ids):
        end = next((i for i, t in enumerate(new_ids) if t in self.stop_ids), len(new_ids))
        return self.tokenizer.decode(new_ids[:end], skip_special_tokens=True).strip()


class VLLMGenerator(HFGenerator):
    """vLLM on the same token ids and stop tokens. UNTESTED: vLLM is not installed where the tests run."""

    def __init__(self, final, tokenizer, stop_ids, settings, device=None, dtype="auto"):
        from vllm import LLM, SamplingParams
        self.tokenizer, self.stop_ids = tokenizer, stop_ids
        self.llm = LLM(model=str(final), dtype=dtype, seed=settings.seed)
        self.params = SamplingParams(temperature=settings.temperature, top_p=settings.top_p if settings.temperature
                                     else 1.0, max_tokens=settings.max_new_tokens, stop_token_ids=stop_ids)

    def answer(self, conversations):
        prompts = [{"prompt_token_ids": prompt_ids(self.tokenizer, m)} for m in conversations]
        outs = self.llm.generate(prompts, self.params, use_tqdm=False)
        return [self._text(list(o.outputs[0].token_ids)) for o in outs]


def make_generator(final, tokenizer, stop_ids, settings, engine="auto", device=None, dtype="auto"):
    """vLLM when installed and a GPU is present (engine auto), else transformers."""
    import importlib.util

    import torch
    if engine == "auto":
        engine = "vllm" if importlib.util.find_spec("vllm") and torch.cuda.is_available() else "hf"
    cls = VLLMGenerator if engine == "vllm" else HFGenerator
    return cls(final, tokenizer, stop_ids, settings, device=device, dtype=dtype)


# ---------------------------------------------------------------- the loop

def answer_all(name, prompts, out, generator, tokenizer, model_id, settings, batch_size, progress=True):
    """Answer the prompts not yet in `out` in batches sorted by prompt length, rewriting `out` (in the
    prompt file's order) after each batch. Returns the records, in prompt order."""
    from tqdm import tqdm
    done = load_done(out, model_id, settings)
    # longest first: batches of like lengths pad little, and a batch too large for memory fails at once
    todo = sorted((p for p in prompts if p.id not in done),
                  key=lambda p: -len(prompt_ids(tokenizer, [{"role": "user", "content": p.turns[0]}])))
    order = [p.id for p in prompts]
    bar = tqdm(total=len(prompts), initial=len(prompts) - len(todo), desc=f"{name} answers", disable=not progress)
    with bar:
        for start in range(0, len(todo), batch_size):
            batch = todo[start:start + batch_size]
            chats = [[] for _ in batch]
            for turn in range(len(batch[0].turns)):  # MT-Bench: turn 2 follows the model's own first answer
                for chat, p in zip(chats, batch):
                    chat.append({"role": "user", "content": p.turns[turn]})
                for chat, a in zip(chats, generator.answer(chats)):
                    chat.append({"role": "assistant", "content": a})
            for p, chat in zip(batch, chats):
                done[p.id] = make_record(name, p, [m["content"] for m in chat[1::2]], model_id, settings)
            write_atomic(out, dump(name, [done[i] for i in order if i in done]))
            bar.update(len(batch))
    return [done[i] for i in order]
