"""Every command-line failure is one line on stderr, names the flag, file or field, and exits with
the status of its class (splitkernels.cli.errors.Exit); --debug adds the traceback."""
from __future__ import annotations

import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pytest
import torch

from splitkernels.cli import Exit, main
from splitkernels.cli.models import load_model
from splitkernels.codec import CodecConfig
from splitkernels.nn import QuantConfig
from splitkernels.planner import Plan
from splitkernels.runtime import Limits, split_model
from splitkernels.runtime.grpc_transport import GrpcServer

REPO = Path(__file__).resolve().parents[1]


def run(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        try:
            code = main(list(argv))
        except SystemExit as exc:  # argparse
            code = exc.code
    return int(code), out.getvalue(), err.getvalue()


def fails(expected: Exit, *argv: str, says: tuple[str, ...] = ()) -> str:
    code, _, err = run(*argv)
    assert code == expected, (code, err)
    assert err.count("\n") == 1 and err.startswith("splitkernels"), err  # one line, no traceback
    for words in says:
        assert words in err, (words, err)
    return err


def _plan(**override) -> dict:
    d = Plan(split_layer=2, front=QuantConfig(8, 64), back=None, codec=CodecConfig(), max_seq_len=64).to_dict()
    d.update(override)
    return d


def _write(tmp_path: Path, name: str, data) -> str:
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return str(path)


def test_bad_flags_are_usage_errors():
    fails(Exit.USAGE, "serve", "--port", "99999", says=("--port", "65535"))
    fails(Exit.USAGE, "serve", "--port", "http", says=("--port", "integer"))
    fails(Exit.USAGE, "edge", "--temperature", "-1", says=("--temperature", "> 0"))
    fails(Exit.USAGE, "edge", "--top-p", "1.5", says=("--top-p",))
    fails(Exit.USAGE, "demo", "--max-new-tokens", "0", says=("--max-new-tokens",))
    fails(Exit.USAGE, "profile", "--formats", "dense,5", says=("--formats", "'5'"))
    fails(Exit.USAGE, "edge", "--no-such-flag", says=("--no-such-flag",))
    fails(Exit.USAGE, "demo", "--model", "tiny", "--split-layer", "6", says=("--split-layer", "[1, 5]"))
    fails(Exit.USAGE, "demo", "--model", "tiny", "--codec", "v2", "--avg-bits", "4", says=("--avg-bits", "--bits"))
    fails(Exit.USAGE, "demo", "--model", "tiny", "--codec", "v1", "--lossless", says=("--lossless", "--codec v1"))
    fails(Exit.USAGE, "demo", "--model", "tiny", "--bits", "0.5", says=("--bits",))
    fails(Exit.USAGE, "demo", "--model", "tiny", "--codec", "v1", "--coder", "auto", says=("--coder auto", "v2"))
    fails(Exit.USAGE, "demo", "--model", "tiny", "--lossless", "--coder", "nibble", says=("--coder nibble", "v2"))
    fails(Exit.USAGE, "demo", "--model", "tiny", "--coder", "huffman", says=("--coder", "'huffman'"))
    fails(Exit.USAGE, "demo", "--model", "tiny", "--family", "bert_nope", says=("--family", "causal-LM", "'bert_nope'"))


def test_a_budget_below_the_codec_floor_is_refused():
    err = fails(Exit.USAGE, "demo", "--model", "tiny", "--avg-bits", "1", says=("--avg-bits 1", "at least"))
    floor = float(re.search(r"at least ([0-9.]+)", err).group(1))
    assert 2 < floor < 3  # 2-bit codes plus 7 bytes per 128-element token


def test_plan_files_are_checked_against_the_schema(tmp_path):
    cases = {
        "missing": (str(tmp_path / "nope.json"), "No such file"),
        "not json": (_write(tmp_path, "bad.json", "{split_layer: 2"), "not valid JSON"),
        "a list": (_write(tmp_path, "list.json", [1, 2]), "JSON object"),
        "float layer": (_write(tmp_path, "float.json", _plan(split_layer=2.7)), "'split_layer': must be an integer"),
        "no codec": (_write(tmp_path, "nocodec.json", {k: v for k, v in _plan().items() if k != "codec"}),
                     "'codec': is missing"),
        "codec list": (_write(tmp_path, "codeclist.json", _plan(codec=[])), "'codec': must be a JSON object"),
        "bad bits": (_write(tmp_path, "bits.json", _plan(front={"bits": 5, "group_size": 64})), "'front.bits'"),
        "bad width": (_write(tmp_path, "width.json", _plan(codec={**CodecConfig().to_dict(), "bit_choices": [2, 12]})),
                      "'codec.bit_choices'"),
        "bad mode": (_write(tmp_path, "mode.json", _plan(codec={**CodecConfig().to_dict(), "mode": "budget"})),
                     "avg_bits"),
        "zero length": (_write(tmp_path, "len.json", _plan(max_seq_len=0)), "'max_seq_len'"),
        "version": (_write(tmp_path, "ver.json", _plan(version=9)), "'version'"),
        "deep split": (_write(tmp_path, "deep.json", _plan(split_layer=6)), "'split_layer': must be in [1, 5]"),
    }
    for name, (path, words) in cases.items():
        fails(Exit.INPUT_FILE, "demo", "--model", "tiny", "--plan", path, says=(path, words))


def test_v2_codecs_in_plan_files_are_checked(tmp_path):
    from splitkernels.codec import calibrate
    from splitkernels.codec.spec import config_to_dict

    v2 = config_to_dict(calibrate(torch.randn(300, 128, generator=torch.Generator().manual_seed(1)), bits=4.0))
    forged = {**v2, "step": [2 * s for s in v2["step"]]}  # the fingerprint no longer matches
    cases = {
        "forged": (_plan(codec=forged), "fingerprint"),
        "no steps": (_plan(codec={k: v for k, v in v2.items() if k != "step"}), "'codec'"),
        "bad kmax": (_plan(codec={**v2, "kmax": 0, "fingerprint": None}), "kmax"),
    }
    for name, (plan, words) in cases.items():
        path = _write(tmp_path, f"{name}.json", plan)
        fails(Exit.INPUT_FILE, "demo", "--model", "tiny", "--plan", path, says=(path, words))
    narrow = config_to_dict(calibrate(torch.randn(300, 64, generator=torch.Generator().manual_seed(2)), bits=4.0))
    path = _write(tmp_path, "narrow.json", _plan(codec=narrow))  # d = 64 for a 128-wide model
    code, _, err = run("demo", "--model", "tiny", "--plan", path, "--max-new-tokens", "1", "--eval-tokens", "0")
    assert code != 0 and err.count("\n") == 1 and "d = 64" in err, (code, err)


def test_quality_and_profile_files_name_their_field(tmp_path):
    from importlib import resources

    table = json.loads(resources.files("splitkernels.planner").joinpath("smollm2_quality.json").read_text())
    table["points"][3]["tokens"] = "many"
    path = _write(tmp_path, "q.json", table)
    fails(Exit.INPUT_FILE, "plan", "--model", "tiny", "--quality", path, says=(path, "'points[3].tokens'"))
    table["points"][3]["tokens"] = 1022
    for shifts in ([3, 0], [7], "3", [True]):
        table["points"][2]["position_shift"] = shifts
        path = _write(tmp_path, "q.json", table)
        fails(Exit.INPUT_FILE, "plan", "--model", "tiny", "--quality", path, says=(path, "'points[2].position_shift'"))
    profile = {"version": 1, "prompt_tokens": 8, "formats": {"dense": {"decode_layer_s": 1e-3}},
               "codec": {"frames": {}}}
    path = _write(tmp_path, "p.json", profile)
    fails(Exit.INPUT_FILE, "plan", "--model", "tiny", "--edge-profile", path,
          says=(path, "'formats.dense.prefill_layer_s': is missing"))


def test_connection_auth_and_refusal_have_their_own_status():
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        closed = f"127.0.0.1:{s.getsockname()[1]}"
    fails(Exit.CONNECTION, "edge", "--model", "tiny", "--server", closed, "--retries", "0", says=(closed,))
    loaded = load_model("tiny")
    sm = split_model(loaded.model, 2, limits=Limits(max_sessions=2, max_seq_len=64))
    with GrpcServer(sm.manager, token="tok") as server:
        edge = ("edge", "--model", "tiny", "--server", server.address, "--max-new-tokens", "2")
        fails(Exit.AUTH, *edge, "--token", "wrong", says=("refused the token",))
        fails(Exit.REFUSED, *edge, "--token", "tok", "--seed", "1", says=("fingerprint mismatch",))
        fails(Exit.REFUSED, *edge, "--token", "tok", "--prompt", "x" * 80, says=("RESOURCE_EXHAUSTED", "64"))
        code, _, err = run("--debug", *edge, "--token", "wrong")
        assert code == Exit.AUTH and "Traceback" in err and err.strip().endswith("SPLITKERNELS_TOKEN")


def test_serve_refuses_a_taken_port_and_an_open_host_without_token():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        taken = str(s.getsockname()[1])
        fails(Exit.CONNECTION, "serve", "--model", "tiny", "--port", taken, says=(f"127.0.0.1:{taken}", "in use"))
    fails(Exit.USAGE, "serve", "--model", "tiny", "--host", "0.0.0.0", "--port", "0", says=("--token", "--insecure"))


def test_serve_follows_the_plan_and_drains_on_sigterm(tmp_path):
    path = _write(tmp_path, "plan.json", _plan())
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    server = subprocess.Popen([sys.executable, "-m", "splitkernels", "serve", "--model", "tiny", "--port", "0",
                               "--plan", path, "--drain", "1"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=env)
    try:
        line = server.stdout.readline()
        assert "max_seq_len 64" in line and "layers 3..6" in line, line
        server.send_signal(signal.SIGTERM)
        out, err = server.communicate(timeout=60)
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
    assert server.returncode == 0, err
    assert "SIGTERM: draining 0 session(s)" in out and out.strip().endswith("stopped")


def test_an_unmet_budget_warns(capsys):
    from splitkernels.cli.generate import _warn_unmet_budget

    _warn_unmet_budget(CodecConfig(mode="budget", avg_bits=3.0), {"bits_per_element_decode": 3.5})
    assert capsys.readouterr().err.startswith("warning: the budget of 3 bits/element was not met")
    _warn_unmet_budget(CodecConfig(mode="budget", avg_bits=3.0), {"bits_per_element_decode": 3.01})
    _warn_unmet_budget(CodecConfig(), {"bits_per_element_decode": 9.0})
    assert capsys.readouterr().err == ""


def test_exposed_server_warns_without_tls(capsys):
    from argparse import Namespace

    from splitkernels.cli.errors import UsageError
    from splitkernels.cli.serve import _check_exposure, is_loopback

    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("10.1.2.3") and not is_loopback("example.org")
    _check_exposure(Namespace(host="10.1.2.3", token="t", insecure=False, tls_cert=None))
    assert capsys.readouterr().err.startswith("warning: serving on 10.1.2.3 without TLS")
    _check_exposure(Namespace(host="10.1.2.3", token=None, insecure=True, tls_cert="cert.pem"))
    _check_exposure(Namespace(host="127.0.0.1", token=None, insecure=False, tls_cert=None))
    assert capsys.readouterr().err == ""
    with pytest.raises(UsageError, match="--insecure"):
        _check_exposure(Namespace(host="example.org", token=None, insecure=False, tls_cert=None))
