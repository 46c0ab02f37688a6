"""Causal LM (chat SFT): label masking, formats, learning, the forgetting probe, tied weights,
and the packaged SmolLM2 end to end (slow)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from tether.config import validate_job
from tether.errors import DataError
from tether.tasks.causal_lm import CausalLM


def lm_job(model_dir: Path, source: str, root: Path, **sections) -> dict:
    job = {
        "name": "lm",
        "model": {"name": str(model_dir), "task": "causal-lm"},
        "data": {"train": source, "max_length": 128},
        "objective": {"lambda": 0.0},
        "optim": {"lr": 3e-3, "warmup_ratio": 0.0},
        "train": {"epochs": 1, "batch_size": 8, "eval_interval": 10, "seed": 1},
        "eval": {
            "generate_examples": 8,
            "max_new_tokens": 10,
            "samples": 0,
            "probe_max_new_tokens": 12,
        },
        "scaling": {"num_workers": 0},
        "tracking": {"enabled": False},
        "storage": {"path": str(root)},
    }
    for section, values in sections.items():
        job[section] = {**job.get(section, {}), **values}
    return job


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def taught_chats(n: int) -> list[dict]:
    """n chats that all teach one answer ("tether says hi.") to numbered questions."""
    return [
        {
            "messages": [
                {"role": "user", "content": f"Question number {i}?"},
                {"role": "assistant", "content": "tether says hi."},
            ]
        }
        for i in range(n)
    ]


@pytest.fixture(scope="module")
def tokenizer(tiny_llama_dir):
    return CausalLM().load_tokenizer(str(tiny_llama_dir), None, False)


CHATS = [
    {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hello there"},
            {"role": "assistant", "content": "Hi! How can I help?"},
            {"role": "user", "content": "Name a colour."},
            {"role": "assistant", "content": "Blue."},
        ]
    },
    {"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]},
]


def test_exactly_the_assistant_turns_and_their_end_of_turn_are_targets(tokenizer, tmp_path):
    """In a collated chat batch the labelled tokens decode, turn by turn, to each assistant
    message followed by the end-of-turn token; system, user and template text carry -100."""
    task = CausalLM()
    encoded, stats = task.encode(CHATS, tokenizer, "validation")
    batch = encoded.collate(np.arange(2), tokenizer.pad_token_id)
    end = tokenizer.eos_token  # <|im_end|>: SmolLM2's end of turn, and its EOS
    for row, chat in enumerate(CHATS):
        ids, labels = batch["input_ids"][row], batch["labels"][row]
        targets = labels != -100
        assert torch.equal(labels[targets], ids[targets])
        # runs of consecutive labelled positions are the assistant turns, in order
        runs, current = [], []
        for position in range(len(ids)):
            if targets[position]:
                current.append(int(ids[position]))
            elif current:
                runs.append(current)
                current = []
        if current:
            runs.append(current)
        expected = [m["content"] + end for m in chat["messages"] if m["role"] == "assistant"]
        assert [tokenizer.decode(r) for r in runs] == expected
    assert stats == {"examples": 2, "truncated": 0, "dropped_no_target": 0}


def test_prompt_completion_and_plain_text_formats(tokenizer, tmp_path):
    """prompt+completion: the completion and EOS are targets; text: every token and EOS."""
    task = CausalLM()
    ids, targets = task.render({"prompt": "Q: sky? A:", "completion": " blue"}, tokenizer)
    assert tokenizer.decode([t for t, k in zip(ids, targets) if k]) == " blue" + tokenizer.eos_token
    assert not any(targets[: len(tokenizer("Q: sky? A:")["input_ids"]) - 1])
    # a prompt ending in a space: the completion's first word is still learnt, and the prompt
    # is the very tokens /v1/completions gives the model
    prompt = "Capital of France? A: "
    ids, targets = task.render({"prompt": prompt, "completion": "Paris"}, tokenizer)
    learnt = tokenizer.decode([t for t, k in zip(ids, targets, strict=True) if k])
    assert learnt == "Paris" + tokenizer.eos_token
    served = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    assert ids[: len(served)] == served and not any(targets[: len(served)])
    ids, targets = task.render({"text": "once upon a time"}, tokenizer)
    assert all(targets) and ids[-1] == tokenizer.eos_token_id


def test_plain_text_data_evaluates_without_generating(tiny_llama_dir, tmp_path):
    """A `text` row is all target: there is no prompt to answer, so no exact match and no
    samples (generating from an empty prompt crashed the first evaluation); a chat row
    beside it is still answered."""
    from tether.run import prepare_run_data
    from tether.train.loop import score_split
    from tether.train.strategy import DataParallel

    texts = [{"text": f"The cat number {i} sat on the mat."} for i in range(12)]
    path = write_jsonl(tmp_path / "texts.jsonl", texts)
    spec = validate_job(
        lm_job(tiny_llama_dir, str(path), tmp_path, eval={"samples": 2, "forgetting_probe": "none"})
    )
    task, data = prepare_run_data(spec)
    model = task.load_model(str(tiny_llama_dir), None, False).model.eval()
    tokenizer = task.load_tokenizer(str(tiny_llama_dir), None, False)
    strategy = DataParallel(0, 1, torch.device("cpu"))

    def score(split, counts_fn, size):
        return score_split(model, split, counts_fn, size, data.pad_id, spec, strategy)

    assert "eval/exact_match" not in task.extra_metrics(model, tokenizer, data, score)
    assert task.samples(model, tokenizer, data.validation, 2) == []


def test_the_forgetting_probe_does_not_depend_on_the_training_max_length(
    tiny_llama_dir, tmp_path, monkeypatch
):
    """The probe is encoded at its own length: at a training max_length of 48 the probe's
    chats would be cut to no answer at all (θ*'s NLL 0/0, forgetting NaN at every step)."""
    from tether.run import prepare_run_data

    monkeypatch.setenv("TETHER_CACHE", str(tmp_path / "cache"))
    data_section = {"max_length": 48, "max_train_samples": 16, "max_validation_samples": 8}
    spec = validate_job(
        lm_job(
            tiny_llama_dir,
            "synthetic:chat",
            tmp_path,
            data=data_section,
            eval={"generate_examples": 0},
        )
    )
    _, data = prepare_run_data(spec)
    assert data.stats["forgetting_prompts"] >= 50
    assert len(data.extras["forgetting"]) == data.stats["forgetting_prompts"]
    assert math.isfinite(data.stats["forgetting_base_nll"])


def test_offline_answers_stop_where_serving_stops(tiny_llama_dir, tmp_path):
    """Greedy answers (exact match, samples) stop at the model's configured end tokens as
    well as the tokenizer's EOS, as the served engine does."""
    from tether.run import prepare_run_data
    from tether.tasks.causal_lm import greedy_answers

    spec = validate_job(
        lm_job(
            tiny_llama_dir,
            "synthetic:chat",
            tmp_path,
            data={"max_train_samples": 16, "max_validation_samples": 4},
            eval={"generate_examples": 0, "forgetting_probe": "none"},
        )
    )
    task, data = prepare_run_data(spec)
    model = task.load_model(str(tiny_llama_dir), None, False).model.eval()
    tokenizer = task.load_tokenizer(str(tiny_llama_dir), None, False)
    batch = data.validation.collate(np.arange(1), tokenizer.pad_token_id)
    free = greedy_answers(model, tokenizer, batch, 12)[0]
    words = tokenizer(free, add_special_tokens=False)["input_ids"]
    assert len(words) > 4, "the test needs a long free answer"
    model.generation_config.eos_token_id = words[3]  # an end-of-turn token of the model's own
    stopped = greedy_answers(model, tokenizer, batch, 12)[0]
    assert len(stopped) < len(free) and free.startswith(stopped)


def test_batches_are_left_padded_and_score_like_right_padded_ones(tiny_llama_dir, tokenizer):
    """Rows end together (left padding), so the LM head runs on the last positions only; an
    example's first token is never a target (nothing precedes it); the summed NLL and its
    token count equal those of the same rows right-padded."""
    import dataclasses

    from tether.tasks.causal_lm import token_nll

    task = CausalLM(max_length=64)
    rows = [{"text": "once upon a time"}, {"text": "a much longer story about a cat and a mat"}]
    split, _ = task.encode(rows, tokenizer, "validation")
    batch = split.collate(np.arange(2), tokenizer.pad_token_id)
    assert bool(batch["attention_mask"][:, -1].all()) and not bool(batch["attention_mask"][0, 0])
    for i in range(2):
        first_real = int(batch["attention_mask"][i].argmax())
        assert int(batch["labels"][i, first_real]) == -100
    model = CausalLM().load_model(str(tiny_llama_dir), None, False).model.eval()
    right = dataclasses.replace(split, pad_left=False).collate(np.arange(2), tokenizer.pad_token_id)
    with torch.no_grad():
        left_nll, left_n = token_nll(model, batch)
        right_nll, right_n = token_nll(model, right)
    assert (
        float(left_n)
        == float(right_n)
        == len(tokenizer(rows[0]["text"])["input_ids"])
        + len(tokenizer(rows[1]["text"])["input_ids"])
    )  # every token but each row's first, plus each row's EOS
    assert float(left_nll) == pytest.approx(float(right_nll), rel=1e-5)


def test_long_examples_are_cut_and_counted_and_targetless_ones_dropped(tokenizer):
    """max_length cuts and counts; an example with no target left is dropped, not a NaN."""
    task = CausalLM(max_length=40)
    long_answer = {
        "messages": [
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "word " * 40},
        ]
    }
    long_prompt = {
        "messages": [
            {"role": "user", "content": "word " * 40},
            {"role": "assistant", "content": "ok"},
        ]
    }
    encoded, stats = task.encode([long_answer, long_prompt], tokenizer, "train")
    assert stats == {"examples": 2, "truncated": 2, "dropped_no_target": 1}
    assert len(encoded) == 1 and encoded.lengths[0] == 40


def test_malformed_chats_are_named(tokenizer):
    task = CausalLM()
    with pytest.raises(DataError, match="turn 0 must be"):
        task.encode(
            [{"messages": [{"role": "robot", "content": "x"}], "__where__": "c.jsonl line 3"}],
            tokenizer,
            "train",
        )
    with pytest.raises(DataError, match="c.jsonl line 4 has no assistant turn"):
        task.encode(
            [{"messages": [{"role": "user", "content": "x"}], "__where__": "c.jsonl line 4"}],
            tokenizer,
            "train",
        )


def test_tied_embeddings_are_anchored_once(tiny_llama_dir):
    """The LM head shares the embedding matrix: it appears once in the anchor."""
    from tether.anchor import anchored_parameters, build_anchor

    loaded = CausalLM().load_model(str(tiny_llama_dir), None, False)
    model = loaded.model
    assert model.lm_head.weight is model.model.embed_tokens.weight
    anchored = anchored_parameters(model, loaded.new_param_names)
    names = [n for n, _ in anchored]
    assert len(names) == len(set(id(p) for _, p in anchored))
    assert "model.embed_tokens.weight" in names and "lm_head.weight" not in names
    anchor = build_anchor(anchored, 0.1)
    total = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    assert sum(t.numel() for t in anchor.targets) == total


def test_tiny_llama_learns_a_taught_answer(tiny_llama_dir, tmp_path):
    """Eval loss falls and, after training, greedy generation gives the taught answer."""
    from tether.run import run_training
    from tether.tasks.causal_lm import greedy_answers

    path = write_jsonl(tmp_path / "taught.jsonl", taught_chats(64))
    job = lm_job(
        tiny_llama_dir,
        str(path),
        tmp_path / "runs",
        train={"epochs": 12, "eval_interval": 14, "keep_checkpoints": 20},
        data={"validation_fraction": 0.125},
        eval={"forgetting_probe": "none"},
    )
    outcome = run_training(validate_job(job))
    from tether.train.checkpoint import checkpoints, read_state

    curve = [read_state(c)["metrics"] for c in checkpoints(outcome.summary["run_dir"])]
    assert curve[-1]["eval/loss"] < 0.5 * curve[0]["eval/loss"]
    assert curve[-1]["eval/exact_match"] == 1.0
    task = CausalLM()
    model_dir = outcome.summary["model_dir"]
    tokenizer = task.load_tokenizer(model_dir, None, False)
    model = task.load_model(model_dir, None, False).model.eval()
    chat = [
        {"role": "user", "content": "Question number 3?"},
        {"role": "assistant", "content": "x"},
    ]
    encoded, _ = task.encode([{"messages": chat}], tokenizer, "validation")
    batch = encoded.collate(np.arange(1), tokenizer.pad_token_id)
    assert greedy_answers(model, tokenizer, batch, 10) == ["tether says hi."]
    card = json.loads((Path(model_dir) / "tether.json").read_text())
    assert card["task"] == "causal-lm" and card["mode"] == "min"


@pytest.fixture(scope="module")
def forgetting_runs(tiny_llama_dir, tmp_path_factory):
    """The same short SFT at λ = 0 and with a strong anchor (same seed)."""
    from tether.run import run_training

    root = tmp_path_factory.mktemp("forgetting")
    runs = {}
    for name, objective in (
        ("plain", {"lambda": 0.0}),
        ("anchored", {"lambda": 50.0, "mode": "coupled"}),
    ):
        job = lm_job(
            tiny_llama_dir,
            "synthetic:chat",
            root / "runs",
            data={"max_train_samples": 96, "max_validation_samples": 16, "max_length": 96},
            objective=objective,
            train={"epochs": 1, "eval_interval": 6},
            storage={"run_name": name},
        )
        runs[name] = run_training(validate_job(job))
    return runs


def test_forgetting_is_zero_for_theta_star_and_rises_less_with_an_anchor(
    forgetting_runs, tiny_llama_dir
):
    """θ* scores 0 on its own probe answers; λ = 0 training forgets; a strong anchor less."""
    from tether.run import prepare_run_data
    from tether.train.loop import score_split
    from tether.train.strategy import DataParallel

    plain, anchored = forgetting_runs["plain"].summary, forgetting_runs["anchored"].summary
    assert plain["metrics"]["eval/forgetting"] > 0.05
    assert anchored["metrics"]["eval/forgetting"] < 0.5 * plain["metrics"]["eval/forgetting"]
    assert "train/drift_l2" not in plain["metrics"]  # λ = 0 keeps no θ* to measure it
    spec = validate_job(
        lm_job(
            tiny_llama_dir,
            "synthetic:chat",
            Path("/tmp"),
            data={"max_train_samples": 96, "max_validation_samples": 16, "max_length": 96},
            eval={"generate_examples": 0},
        )
    )
    task, data = prepare_run_data(spec)
    model = task.load_model(str(tiny_llama_dir), None, False).model.eval()
    strategy = DataParallel(0, 1, torch.device("cpu"))

    def score(split, counts_fn, size):
        return score_split(model, split, counts_fn, size, data.pad_id, spec, strategy)

    at_start = task.extra_metrics(model, None, data, score)
    assert abs(at_start["eval/forgetting"]) < 1e-4
    assert data.stats["forgetting_prompts"] >= 50


@pytest.mark.slow
def test_packaged_smollm2_trains_three_steps_and_exports_a_reloadable_folder(smollm2_dir, tmp_path):
    """SmolLM2 through the GGUF path: 3 steps, then AutoModelForCausalLM reloads the export
    with the logits the training run ended with."""
    from transformers import AutoModelForCausalLM

    from tether.run import run_training

    job = lm_job(
        "packaged:SmolLM2-135M-Instruct",
        "synthetic:chat",
        tmp_path / "runs",
        data={"max_train_samples": 24, "max_validation_samples": 8, "max_length": 64},
        optim={"lr": 1e-5},
        train={"max_steps": 3, "eval_interval": 3, "batch_size": 4},
        eval={"generate_examples": 0, "forgetting_probe": "none"},
    )
    outcome = run_training(validate_job(job))
    assert outcome.summary["step"] == 3
    model_dir = Path(outcome.summary["model_dir"])
    reloaded = AutoModelForCausalLM.from_pretrained(model_dir, use_safetensors=True).eval()
    from safetensors.torch import load_model

    trained = CausalLM().load_model(str(smollm2_dir), None, False).model.eval()  # θ* ...
    load_model(
        trained, str(Path(outcome.summary["checkpoint"]) / "model.safetensors"), strict=False
    )
    ids = torch.tensor([[1, 504, 3458, 314, 260, 1345, 30]])
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, trained(ids).logits)
    card = json.loads((model_dir / "tether.json").read_text())
    assert card["objective"]["base_model"] == "packaged:SmolLM2-135M-Instruct"
    assert (model_dir / "chat_template.jinja").is_file() or "chat_template" in (
        model_dir / "tokenizer_config.json"
    ).read_text()


def test_a_probe_file_with_a_byte_order_mark_reads_its_first_prompt(tmp_path):
    """A forgetting-probe JSONL saved with a UTF-8 BOM reads like one without; a line without
    a prompt is still named."""
    from tether.tasks.causal_lm import probe_prompts  # what eval.forgetting_probe reads

    path = tmp_path / "probe.jsonl"
    path.write_bytes('\ufeff{"prompt": "Name a colour."}\n\n{"prompt": "Say hi."}\n'.encode())
    assert probe_prompts(str(path)) == ["Name a colour.", "Say hi."]
    path.write_text('{"prompt": "ok"}\n{"question": "no prompt"}\n')
    with pytest.raises(DataError, match="line 2 needs a 'prompt' field"):
        probe_prompts(str(path))
