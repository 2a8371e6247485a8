"""lowrank.torch.codebooks: the tensor tables are the NumPy reference's, bit for bit, on the
device asked for. (The NumPy tables against their formulas are in tests/numpy/test_codebooks.py,
against bitsandbytes' in tests/interop/test_bitsandbytes.py.)"""

import pytest
import torch

from lowrank.numpy import codebooks as np_codebooks
from lowrank.torch import codebooks
from lowrank.torch.codebooks import code_for, dynamic_map, nf4_code


def test_tables():
    assert torch.equal(nf4_code(), torch.from_numpy(np_codebooks.nf4_code()))
    assert code_for("fp4").shape == (16,) and dynamic_map().shape == (256,)


@pytest.mark.parametrize("name", ["nf4_code", "fp4_code", "int4_code", "dynamic_map"])
def test_every_table_is_the_numpy_table_on_the_device_asked_for(name):
    table = getattr(codebooks, name)("meta")
    assert table.is_meta and table.dtype == torch.float32
    expected = torch.from_numpy(getattr(np_codebooks, name)())
    assert torch.equal(getattr(codebooks, name)("cpu"), expected)
    if name != "dynamic_map":
        assert torch.equal(code_for(name.removesuffix("_code"), "cpu"), expected)
