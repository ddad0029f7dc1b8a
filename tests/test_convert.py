"""``histostudio convert``: tensor-dict pickles become safetensors; anything else is refused, nothing written."""

from __future__ import annotations

import os
import pickle
import sys
from collections import OrderedDict

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from studio.cli import app, main
from studio.convert import convert_checkpoint
from studio.errors import InputError, WeightsError

runner = CliRunner()


class Head:  # an arbitrary object, as training scripts pickle alongside weights
    def __init__(self):
        self.width = 3


class RunsCode:  # what a malicious pickle does: call a function while loading
    def __reduce__(self):
        return (os.system, ("echo unpickled > /dev/null",))


def test_tensor_dict_pth_converts_exactly(tmp_path):
    shared = torch.randn(4, 3)
    state = OrderedDict([("blocks.0.attn.qkv.weight", shared), ("tied.weight", shared),  # tied: shared storage
                         ("half", torch.randn(5).half()), ("strided", torch.arange(10.0)[::2]),
                         ("ids", torch.arange(6, dtype=torch.int64).reshape(2, 3))])
    src = tmp_path / "pytorch_model.bin"
    torch.save(state, src)
    done = convert_checkpoint(src, tmp_path / "model.safetensors")
    assert done.tensors == 5 and done.nested_under is None and done.ignored == []
    back = load_file(str(done.path))
    assert set(back) == set(state)
    for key, value in state.items():
        assert back[key].dtype == value.dtype and torch.equal(back[key], value)


def test_training_checkpoint_nested_under_state_dict(tmp_path):
    src = tmp_path / "lora.pth"
    torch.save({"state_dict": {"attn2.to_q.lora_A.weight": torch.ones(4, 8)}, "epoch": 7, "lr": 1e-4}, src)
    result = runner.invoke(app, ["convert", str(src), "--out", str(tmp_path / "lora.safetensors")])
    assert result.exit_code == 0, result.output
    assert "wrote 1 tensors (from 'state_dict')" in result.output and "epoch, lr" in result.output
    assert torch.equal(load_file(str(tmp_path / "lora.safetensors"))["attn2.to_q.lora_A.weight"], torch.ones(4, 8))


@pytest.mark.parametrize("payload, words", [
    ({"weight": torch.zeros(2), "head": Head()}, "Python object"),
    ({"w": RunsCode()}, "refused"),
    ({"weight": torch.zeros(2), "meta": {"epoch": 3}}, "'meta' is a dict, not a tensor"),
    ([torch.zeros(2)], "holds a list, not a dict of tensors"),
    ({}, "empty dict"),
])
def test_refuses_anything_but_a_tensor_dict_and_writes_nothing(tmp_path, payload, words):
    src = tmp_path / "in" / "checkpoint.pth"
    src.parent.mkdir()
    if isinstance(payload, dict) and any(isinstance(v, RunsCode) for v in payload.values()):
        src.write_bytes(pickle.dumps(payload))  # a legacy pickle that would run code when loaded freely
    else:
        torch.save(payload, src)
    out = tmp_path / "out" / "converted.safetensors"
    with pytest.raises(WeightsError, match=words) as err:
        convert_checkpoint(src, out)
    assert "\n" not in str(err.value) and "nothing was written" in str(err.value)
    assert not out.parent.exists()  # not even the output folder
    assert sorted(p.name for p in src.parent.iterdir()) == ["checkpoint.pth"]


def test_cli_refusal_is_one_line_exit_2(tmp_path):
    src = tmp_path / "virtual_staining_her2.pth"
    torch.save({"lora": torch.zeros(1), "config": Head()}, src)
    out = tmp_path / "her2.safetensors"
    argv = sys.argv
    sys.argv = ["histostudio", "convert", str(src), "--out", str(out)]
    try:
        with pytest.raises(SystemExit) as exit_info:
            main()
    finally:
        sys.argv = argv
    assert exit_info.value.code == 2 and not out.exists()


def test_output_rules(tmp_path):
    src = tmp_path / "w.pth"
    torch.save({"a": torch.zeros(1)}, src)
    with pytest.raises(InputError, match=r"\.safetensors"):
        convert_checkpoint(src, tmp_path / "w.bin")
    with pytest.raises(InputError, match="no such"):
        convert_checkpoint(tmp_path / "missing.pth", tmp_path / "w.safetensors")
    convert_checkpoint(src, tmp_path / "w.safetensors")
    with pytest.raises(InputError, match="--overwrite"):
        convert_checkpoint(src, tmp_path / "w.safetensors")
    assert convert_checkpoint(src, tmp_path / "w.safetensors", overwrite=True).tensors == 1
