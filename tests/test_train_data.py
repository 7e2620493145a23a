"""`badam-ext train --model PATH --data FILE --out DIR`: reading the common JSON shapes, loss on the
responses only, padding and packing, the saved model, and bad input (file and line named, nothing written)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from _tiny_tokenizer import byte_tokenizer, save_tiny_checkpoint

from badam_ext import cli
from badam_ext.finetune_data import IGNORE_INDEX, DataError, load_examples, read_records

transformers = pytest.importorskip("transformers")


def _jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _trained_text(tok, ids: torch.Tensor, labels: torch.Tensor) -> str:
    return tok.decode(ids[labels != IGNORE_INDEX])


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer()


def test_records_keep_their_line_numbers_in_jsonl_and_json(tmp_path):
    jsonl = tmp_path / "a.jsonl"
    jsonl.write_text('{"text": "a"}\n\n{"text": "b"}\n')
    assert [(r.data["text"], r.line) for r in read_records(jsonl)] == [("a", 1), ("b", 3)]
    array = tmp_path / "a.json"
    array.write_text('[\n  {"text": "a"},\n\n  {"text":\n "b"}\n]\n')
    assert [(r.data["text"], r.line) for r in read_records(array)] == [("a", 2), ("b", 4)]
    one = tmp_path / "one.json"
    one.write_text('\n{\n  "text": "c"\n}\n')
    assert [(r.data["text"], r.line) for r in read_records(one)] == [("c", 2)]
    (tmp_path / "bad.jsonl").write_text('{"text": "a"}\n{"text": \n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: invalid JSON"):
        read_records(tmp_path / "bad.jsonl")
    with pytest.raises(DataError, match="missing.json: no such file"):
        read_records(tmp_path / "missing.json")


def test_each_shape_trains_on_its_response_only(tmp_path, tok):
    messages = [{"role": "system", "content": "Be short."}, {"role": "user", "content": "2+2?"},
                {"role": "assistant", "content": "4"}, {"role": "user", "content": "3+3?"},
                {"role": "assistant", "content": "6"}]
    path = _jsonl(tmp_path / "shapes.jsonl", [
        {"text": "plain words"},
        {"prompt": "Q: 1+1?", "completion": " A: 2"},
        {"instruction": "Add.", "input": "5 7", "output": "12"},
        {"messages": messages},
    ])
    ex = load_examples(path, tok, seq_len=96)
    assert len(ex) == 4 and ex.input_ids.shape == (4, 96)
    trained = [_trained_text(tok, ex.input_ids[i], ex.labels[i]) for i in range(4)]
    assert trained[0] == "plain words</s>"
    assert trained[1] == " A: 2</s>"
    assert trained[2] == "12</s>\n"  # through the chat template: the assistant turn and its end
    assert trained[3] == "4</s>\n6</s>\n"  # both assistant turns, no user or system text
    whole = tok.decode(ex.input_ids[3][ex.attention_mask[3].bool()])
    assert whole == tok.apply_chat_template(messages, tokenize=False)
    assert ex.input_ids[1, 0] == tok.bos_token_id and ex.labels[1, 0] == IGNORE_INDEX
    pads = ex.attention_mask == 0
    assert (ex.labels[pads] == IGNORE_INDEX).all() and (ex.input_ids[pads] == tok.pad_token_id).all()


def test_alpaca_without_a_chat_template_uses_a_plain_prompt(tmp_path):
    plain = byte_tokenizer(chat_template=False)
    path = _jsonl(tmp_path / "alpaca.jsonl", [{"instruction": "Name a color.", "output": "Blue"}])
    ex = load_examples(path, plain, seq_len=64)
    assert _trained_text(plain, ex.input_ids[0], ex.labels[0]) == "Blue</s>"
    assert "### Response:" in plain.decode(ex.input_ids[0])
    with pytest.raises(DataError, match="no chat template"):
        load_examples(_jsonl(tmp_path / "m.jsonl", [{"messages": [{"role": "assistant", "content": "x"}]}]),
                      plain, seq_len=64)


def test_packing_places_whole_examples_in_rows(tmp_path, tok):
    path = _jsonl(tmp_path / "p.jsonl", [{"prompt": "ab", "completion": "cd"}] * 5)  # 6 tokens each
    padded, packed = load_examples(path, tok, 16), load_examples(path, tok, 16, pack=True)
    assert len(padded) == 5 and len(packed) == 3  # 2 + 2 + 1 examples per row of 16
    assert packed.num_examples == padded.num_examples == 5
    assert packed.trained_tokens == padded.trained_tokens == 5 * 3
    assert packed.attention_mask.sum(1).tolist() == [12, 12, 6]


@pytest.mark.parametrize("records, message", [
    ([{"text": "ok"}, {"question": "q", "answer": "a"}], r":2: the record has none of the known fields"),
    ([{"text": "x" * 40}], r":1: the example is 42 tokens, longer than --seq-len 32"),
    ([{"messages": [{"role": "user", "content": "hi"}]}], r":1: .*no assistant message"),
    ([{"prompt": "p", "completion": 3}], r":1: field 'completion' must be a string"),
])
def test_bad_records_name_the_file_and_line(tmp_path, tok, records, message):
    path = _jsonl(tmp_path / "bad.jsonl", records)
    with pytest.raises(DataError, match=f"bad.jsonl{message}"):
        load_examples(path, tok, seq_len=32)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return save_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "model", num_layers=2)


def _train_args(checkpoint: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--model", str(checkpoint), "--data", str(data), "--out", str(out), "--seq-len", "48",
            "--batch-size", "8", "--switch-every", "3", "--lr", "1e-2", "--no-progress", "--sample-interval", "0",
            *extra]


def test_train_on_a_file_saves_a_loadable_finetuned_model(tmp_path, checkpoint):
    records = [{"instruction": f"Add {a} and {b}.", "output": f"{a + b}"} for a in range(8) for b in range(8)]
    data = _jsonl(tmp_path / "add.jsonl", records)
    out = tmp_path / "run"
    assert cli.main(_train_args(checkpoint, data, out, "--steps", "12", "--pack")) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 12 and summary["blocks"] == 2 and summary["eval_data"] == str(data)
    assert summary["eval_loss_after"] < summary["eval_loss_before"] - 0.3
    saved = out / "model"
    assert (saved / "model.safetensors").is_file() and not (out / "model.partial").exists()
    model = transformers.AutoModelForCausalLM.from_pretrained(saved)
    tokenizer = transformers.AutoTokenizer.from_pretrained(saved)
    assert tokenizer.chat_template and tokenizer("12")["input_ids"] == byte_tokenizer()("12")["input_ids"]
    before = transformers.AutoModelForCausalLM.from_pretrained(checkpoint).state_dict()
    changed = {n for n, p in model.state_dict().items() if not torch.equal(p, before[n])}
    assert changed and all(n.startswith("model.layers.") for n in changed)  # embeddings frozen by default


def test_bad_input_fails_with_a_message_and_writes_nothing(tmp_path, checkpoint, capsys):
    out = tmp_path / "never"
    bad = _jsonl(tmp_path / "data.jsonl", [{"text": "fine"}, {"text": "fine"}, {"label": 1}])
    assert cli.main(_train_args(checkpoint, bad, out)) == 2
    err = capsys.readouterr().err
    assert f"{bad}:3: the record has none of the known fields" in err and "Traceback" not in err
    assert cli.main(_train_args(checkpoint, tmp_path / "absent.jsonl", out)) == 2
    assert "absent.jsonl: no such file" in capsys.readouterr().err
    assert cli.main(["train", "--data", str(bad), "--out", str(out), "--no-progress"]) == 2
    assert "--data needs --model" in capsys.readouterr().err
    assert not out.exists()
