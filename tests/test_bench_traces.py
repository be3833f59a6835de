from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from labkit.bench.traces import (TraceFormatError, load_azure_csv, load_mooncake_jsonl, load_trace,
                                 prefix_block_reuse, shared_azure_trace)


def write_azure(path: Path) -> Path:
    # out of order on purpose: the loader sorts by arrival
    path.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n"
                    "2023-11-16 18:15:47.1805900,300,30\n"
                    "2023-11-16 18:15:46.6805900,100,10\n"
                    "2023-11-16 18:15:49.6805900,5000,50\n"
                    "2023-11-16 18:15:48.6805900,200,20\n")
    return path


def test_azure_csv_loader_sorts_and_times(tmp_path: Path) -> None:
    t = load_azure_csv(write_azure(tmp_path / "conv.csv"))
    assert len(t) == 4
    np.testing.assert_allclose(t.arrival_s, [0.0, 0.5, 2.0, 3.0])
    assert t.prompt_tokens.tolist() == [100, 300, 200, 5000]
    assert t.output_tokens.tolist() == [10, 30, 20, 50]
    assert t.duration_s == pytest.approx(3.0)
    assert t.mean_rate_rps == pytest.approx(1.0)
    st = t.stats()
    assert st["requests"] == 4 and st["prompt_max"] == 5000 and st["output_p50"] == 20
    w = t.window(0.4, 2.0)
    assert w.prompt_tokens.tolist() == [300, 200] and w.arrival_s.tolist() == pytest.approx([0.0, 1.5])
    assert t.time_scaled(2.0).duration_s == pytest.approx(1.5)
    assert len(t.head(2)) == 2 and load_trace(tmp_path / "conv.csv").name == "conv"


def test_azure_csv_numeric_timestamps_and_requests(tmp_path: Path) -> None:
    p = tmp_path / "num.csv"
    p.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n10.0,1000,100\n10.25,3000,300\n12.0,100,10\n")
    t = load_azure_csv(p)
    np.testing.assert_allclose(t.arrival_s, [0.0, 0.25, 2.0])
    reqs, info = t.to_requests(max_model_len=1024)
    assert info.factor < 1 and all(r.prompt_tokens + r.output_tokens <= 1024 for r in reqs)
    assert [r.arrival_s for r in reqs] == pytest.approx([0.0, 0.25, 2.0])
    reqs, info = t.to_requests()
    assert info.factor == 1.0 and [r.prompt_tokens for r in reqs] == [1000, 3000, 100]


def test_azure_csv_errors_name_the_problem(tmp_path: Path) -> None:
    p = tmp_path / "bad.csv"
    p.write_text("TIMESTAMP,Prompt,GeneratedTokens\n1,2,3\n")
    with pytest.raises(TraceFormatError, match="ContextTokens"):
        load_azure_csv(p)
    p.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n1,2,3\n2,lots,3\n")
    with pytest.raises(TraceFormatError, match="line 3: ContextTokens='lots'"):
        load_azure_csv(p)
    with pytest.raises(FileNotFoundError, match="nope.csv"):
        load_azure_csv(tmp_path / "nope.csv")
    with pytest.raises(ValueError, match=".txt"):
        load_trace(tmp_path / "x.txt")


def write_mooncake(path: Path) -> Path:
    rows = [
        {"timestamp": 0, "input_length": 1100, "output_length": 20, "hash_ids": [1, 2, 3]},
        {"timestamp": 1500, "input_length": 1300, "output_length": 30, "hash_ids": [1, 2, 4]},
        {"timestamp": 500, "input_length": 600, "output_length": 5, "hash_ids": [7, 8]},
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    return path


def test_mooncake_loader_turns_hash_ids_into_shared_prefixes(tmp_path: Path) -> None:
    t = load_mooncake_jsonl(write_mooncake(tmp_path / "mc.jsonl"))
    assert t.arrival_s.tolist() == pytest.approx([0.0, 0.5, 1.5])
    assert t.prompt_tokens.tolist() == [1100, 600, 1300]
    assert t.hash_ids == [[1, 2, 3], [7, 8], [1, 2, 4]]
    assert prefix_block_reuse(t.hash_ids) == pytest.approx(2 / 8)
    assert t.stats()["prefix_block_reuse"] == pytest.approx(0.25)
    reqs, info = t.to_requests(seed=5)
    a, b, c = reqs
    assert [r.prompt_tokens for r in reqs] == [1100, 600, 1300]
    assert a.prompt_token_ids[:1024] == c.prompt_token_ids[:1024]      # blocks 1, 2 shared
    assert a.prompt_token_ids[1024:1100] != c.prompt_token_ids[1024:1100]
    assert a.prompt_token_ids[:512] != b.prompt_token_ids[:512]
    # scaled into a small context, blocks scale too and the sharing survives
    reqs, info = t.to_requests(max_model_len=400, seed=5)
    blk = round(512 * info.factor)
    assert reqs[0].prompt_token_ids[:2 * blk] == reqs[2].prompt_token_ids[:2 * blk]
    assert all(r.prompt_tokens + r.output_tokens <= 400 for r in reqs)


def test_mooncake_errors_name_the_line(tmp_path: Path) -> None:
    p = tmp_path / "bad.jsonl"
    p.write_text('{"timestamp": 0, "input_length": 10, "output_length": 2, "hash_ids": [1]}\n{"timestamp": 5}\n')
    with pytest.raises(TraceFormatError, match="line 2: KeyError"):
        load_mooncake_jsonl(p)
    p.write_text('{"timestamp": 0, "input_length": 0, "output_length": 2}\n')
    with pytest.raises(TraceFormatError, match="line 1"):
        load_mooncake_jsonl(p)


@pytest.mark.skipif(shared_azure_trace("conv") is None, reason="shared Azure traces not present")
@pytest.mark.parametrize("kind,n,p50_prompt,p50_output", [("conv", 19366, 1020, 129), ("code", 8819, 1469, 13)])
def test_shared_azure_traces_match_their_readme(kind: str, n: int, p50_prompt: int, p50_output: int) -> None:
    t = load_azure_csv(shared_azure_trace(kind))  # type: ignore[arg-type]
    st = t.stats()
    assert st["requests"] == n
    assert st["prompt_p50"] == p50_prompt and st["output_p50"] == p50_output
    assert 55 * 60 < t.duration_s < 60 * 60
