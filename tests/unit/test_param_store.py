"""The per-rank fragment format (apollo_ds.param_store), written here by hand from its
documented layout: any flat range of any tensor-parallel slice reads back equal to slicing
the original tensors with torch, reading only the bytes of the overlapping fragments."""
import json

import numpy as np
import pytest
import torch

from apollo_ds import param_store, rundir
from apollo_ds.config import ConfigError

KEYS = param_store.KEYS


def _store(tmp_path, tensors: dict, layout: dict, vocab_size=None):
    """tensors: name -> {(pp, tp_rank): full TP-local stored tensor for key "param"} (the
    moments are 2x and -x); layout: name -> (partition_dim, tp, dp cut points, vocab_rows,
    full shape). Every copy is cut at the dp points into fragments, fragment k of every copy
    going to file k."""
    d = tmp_path / rundir.PARAMS
    d.mkdir(parents=True)
    files, rows, params = {}, {}, {}
    for name, copies in tensors.items():
        dim, tp, cuts, vocab, shape = layout[name]
        params[name] = {"shape": shape, "partition_dim": dim, "vocab_rows": vocab}
        for (pp, tp_rank), t in copies.items():
            flat = t.reshape(-1)
            bounds = [0, *cuts, flat.numel()]
            for k in range(len(bounds) - 1):
                lo, hi = bounds[k], bounds[k + 1]
                fname = param_store.rank_file(k + 10 * tp_rank + 100 * pp)
                buf = files.setdefault(fname, bytearray())
                rows.setdefault(name, []).append(
                    [fname, pp, tp, tp_rank, list(t.shape), lo, hi - lo, len(buf)])
                for v in (flat[lo:hi], 2 * flat[lo:hi], -flat[lo:hi]):
                    buf += v.float().numpy().astype("<f4").tobytes()
    for fname, buf in files.items():
        (d / fname).write_bytes(bytes(buf))
    index = {"format": 2, "optimizer_step": 7, "vocab_size": vocab_size, "params": params,
             "fragments": rows}
    (d / "index.json").write_text(json.dumps(index))
    return rundir.param_reader(str(tmp_path))


def test_column_split_weight_reads_any_tp_slice_and_range(tmp_path):
    full = torch.arange(8 * 6, dtype=torch.float32).view(8, 6) + 0.5
    r = _store(tmp_path, {"w": {(0, 0): full[:4], (0, 1): full[4:]}},
               {"w": (0, 2, [5, 17], False, [8, 6])})
    assert isinstance(r, param_store.FragmentReader) and r.optimizer_step == 7
    got = r.read("w")
    assert torch.equal(got["param"], full) and torch.equal(got["exp_avg"], 2 * full)
    assert torch.equal(got["exp_avg_sq"], -full)
    for tp in (1, 2, 4, 8):
        for t in range(tp):
            want = full.chunk(tp, 0)[t]
            assert torch.equal(r.read("w", tp, t)["param"], want), (tp, t)
    # a flat range of TP rank 2 of 4 (rows 4-5): only its bytes are read
    r.bytes_read.clear()
    got = r.read("w", 4, 2, flat=(3, 10), keys=("exp_avg",))
    assert torch.equal(got["exp_avg"], 2 * full.chunk(4, 0)[2].reshape(-1)[3:10])
    assert sum(r.bytes_read.values()) == 7 * 4


def test_row_split_weight_reads_row_pieces(tmp_path):
    full = torch.randn(5, 6)
    r = _store(tmp_path, {"w": {(0, 0): full[:, :3].contiguous(),
                                (0, 1): full[:, 3:].contiguous()}},
               {"w": (1, 2, [7], False, [5, 6])})
    assert torch.equal(r.read("w")["param"], full)
    for tp in (1, 2, 3, 6):
        for t in range(tp):
            assert torch.equal(r.read("w", tp, t)["param"], full.chunk(tp, 1)[t]), (tp, t)
    r.bytes_read.clear()
    got = r.read("w", 3, 1, flat=(1, 9), keys=("param",))   # columns 2-3, rows 0..4
    assert torch.equal(got["param"], full[:, 2:4].reshape(-1)[1:9])
    assert sum(r.bytes_read.values()) == 8 * 4
    # the same layout reads each stored fragment back whole, in one read per key
    r.bytes_read.clear()
    r.read("w", 2, 1)
    assert dict(r.bytes_read) == {param_store.rank_file(10): 7 * 4 * 3,
                                  param_store.rank_file(11): 8 * 4 * 3}


def test_vocabulary_rows_keep_stored_padding_and_pad_with_zeros(tmp_path):
    vocab = torch.randn(10, 4)
    stored = torch.cat([vocab, torch.full((2, 4), 99.0)])      # padded to 12 at TP2
    r = _store(tmp_path, {"emb": {(0, 0): stored[:6], (0, 1): stored[6:]}},
               {"emb": (0, 2, [9], True, [10, 4])}, vocab_size=10)
    assert torch.equal(r.read("emb")["param"], vocab)          # export: padding dropped
    assert torch.equal(r.read("emb", 2, 1, padded_rows=12)["param"], stored[6:])
    got = r.read("emb", 4, 3, padded_rows=16)["param"]         # rows 12..15: never stored
    assert torch.equal(got, torch.zeros(4, 4))
    assert torch.equal(r.read("emb", 4, 2, padded_rows=16)["param"], stored[8:12])
    with pytest.raises(ConfigError, match="has 10 vocabulary rows, more than this model's 8"):
        r.read("emb", padded_rows=8)


def test_replicated_tensor_prefers_own_tp_and_pipeline_copy(tmp_path):
    a, b, c = torch.ones(6), 2 * torch.ones(6), 3 * torch.ones(6)
    r = _store(tmp_path, {"ln": {(0, 0): a, (0, 1): b, (1, 0): c}},
               {"ln": (None, 2, [2], False, [6])})
    assert torch.equal(r.read("ln")["param"], a)
    outs = {"param": np.empty(6, dtype="<f4")}
    r.read_into("ln", outs, tp=2, tp_rank=1, pp_rank=0)
    assert (outs["param"] == 2).all()
    r.read_into("ln", outs, tp=4, tp_rank=3, pp_rank=1)       # no TP rank 3 copy: rank 0's
    assert (outs["param"] == 3).all()
    r.read_into("ln", outs, tp=1, tp_rank=0, pp_rank=5)       # no such stage: the first
    assert (outs["param"] == 1).all()


def test_damaged_fragments_are_refused_naming_parameter_and_file(tmp_path):
    full = torch.randn(4, 4)
    r = _store(tmp_path, {"w": {(0, 0): full}}, {"w": (0, 1, [8], False, [4, 4])})
    path = tmp_path / rundir.PARAMS / param_store.rank_file(1)
    path.write_bytes(path.read_bytes()[:40])
    with pytest.raises(ConfigError) as e:
        r.read("w")
    assert str(e.value) == (f"parameter w: {path} ends before byte 64; the checkpoint is "
                            f"truncated: use an older tag")
    index = json.loads((tmp_path / rundir.PARAMS / "index.json").read_text())
    index["fragments"]["w"] = index["fragments"]["w"][:1]      # elements 8.. held by none
    (tmp_path / rundir.PARAMS / "index.json").write_text(json.dumps(index))
    with pytest.raises(ConfigError, match=r"parameter w: .*index.json: no fragment holds "
                                          r"element 8 of TP rank 0's slice; the checkpoint is "
                                          r"corrupt"):
        rundir.param_reader(str(tmp_path)).read("w")
    index["params"]["w"]["shape"] = [2, 4]                     # stored slices do not fit
    (tmp_path / rundir.PARAMS / "index.json").write_text(json.dumps(index))
    with pytest.raises(ConfigError, match=r"stored slices of shape \[4, 4\] x 1 do not fit "
                                          r"the recorded shape \[2, 4\]"):
        rundir.param_reader(str(tmp_path)).read("w")
