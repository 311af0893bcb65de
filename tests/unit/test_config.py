"""The config loader: file, then environment, then flags; every bad key or value is named."""

import re
from pathlib import Path

import pytest
from scripted import ROOT

from agent.config import ConfigError, load, parse_listen, reference


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "jouleprobe.toml"
    path.write_text(text)
    return path


def test_defaults_without_file_or_environment() -> None:
    config = load(environ={})
    assert config.agent.listen == "0.0.0.0:29400"
    assert config.agent.sample_interval == 0.1
    assert config.site.pue == 1.2


def test_file_then_environment_then_overrides(tmp_path: Path) -> None:
    text = '[agent]\nsample_interval = 0.5\nlisten = "127.0.0.1:1"\n[site]\npue = 1\n'
    path = write(tmp_path, text)
    config = load(path, environ={"JOULEPROBE_AGENT_SAMPLE_INTERVAL": "0.25"},
                  overrides={"agent.listen": "127.0.0.1:2"})
    assert config.agent.sample_interval == 0.25
    assert config.agent.listen == "127.0.0.1:2"
    assert config.site.pue == 1.0


@pytest.mark.parametrize(
    ("text", "named"),
    [
        ("[agent]\nsample_intervall = 1\n", "agent.sample_intervall"),
        ("[agent]\nsample_interval = -1\n", "agent.sample_interval: expected a number > 0"),
        ('[agent]\nsample_interval = "fast"\n', "agent.sample_interval: expected float"),
        ("[agent]\nsample_interval = true\n", "agent.sample_interval: expected float"),
        ('[agent]\nlisten = "29400"\n', "agent.listen: expected HOST:PORT"),
        ('[agent]\nlog_level = "loud"\n', "agent.log_level: expected one of"),
        ("[site]\npue = 0.9\n", "site.pue: expected a number >= 1"),
        ("[nodes]\nx = 1\n", "unknown section [nodes]"),
        ("[agent\n", "not valid TOML"),
    ],
)
def test_bad_file_names_the_key(tmp_path: Path, text: str, named: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(named)):
        load(write(tmp_path, text), environ={})


def test_bad_environment_names_the_variable() -> None:
    with pytest.raises(ConfigError, match="JOULEPROBE_NOPE_X"):
        load(environ={"JOULEPROBE_NOPE_X": "1"})
    with pytest.raises(ConfigError, match=re.escape("agent.sample_interval: expected float")):
        load(environ={"JOULEPROBE_AGENT_SAMPLE_INTERVAL": "soon"})


def test_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config file"):
        load(tmp_path / "absent.toml", environ={})


def test_parse_listen_handles_ipv6() -> None:
    assert parse_listen("[::1]:29400") == ("::1", 29400)
    assert parse_listen("127.0.0.1:0") == ("127.0.0.1", 0)


def test_example_config_in_deploy_loads() -> None:
    example = ROOT / "deploy" / "jouleprobe.toml"
    load(example, environ={})


def test_reference_lists_every_key() -> None:
    table = reference()
    for key in ("agent.listen", "agent.sample_interval", "host.rapl_path", "site.pue"):
        assert f"`{key}`" in table


def test_proxy_and_scrape_tables(tmp_path: Path) -> None:
    text = (
        '[[proxy]]\nname = "vllm"\nlisten = "127.0.0.1:8001"\n'
        'upstream = "http://127.0.0.1:8000"\ngpus = [0, 1]\n'
        '[[proxy]]\nname = "tgi"\nlisten = "127.0.0.1:8081"\n'
        'upstream = "http://127.0.0.1:8080"\ngpus = "auto"\nmodel = "llama"\n'
        '[[scrape]]\nkind = "triton"\nurl = "http://127.0.0.1:8002/metrics"\n'
        'gpus = ["GPU-5a1e0000-0000-4000-8000-000000000000"]\n'
    )
    config = load(write(tmp_path, text), environ={})
    assert [p.name for p in config.proxy] == ["vllm", "tgi"]
    assert config.proxy[0].gpus == (0, 1) and config.proxy[1].gpus == "auto"
    assert config.proxy[1].model == "llama" and config.proxy[0].timeout == 600.0
    assert config.scrape[0].kind == "triton" and config.scrape[0].interval == 15.0


@pytest.mark.parametrize(
    ("text", "named"),
    [
        ('[[proxy]]\nname = "x"\nlisten = "127.0.0.1:1"\ngpus = [0]\n',
         "proxy[0]: missing key 'upstream'"),
        ('[[proxy]]\nname = "x"\nlisten = "127.0.0.1:1"\nupstream = "ftp://h"\ngpus = [0]\n',
         "proxy[0].upstream: expected an http:// or https:// URL"),
        ('[[scrape]]\nkind = "x"\nurl = "http://h/metrics"\ngpus = [0]\n',
         "scrape[0].kind: expected one of vllm"),
        ('[[scrape]]\nkind = "vllm"\nurl = "http://h/metrics"\ngpus = []\n',
         "scrape[0].gpus: expected \"auto\" or a non-empty list"),
        ('[[scrape]]\nkind = "vllm"\nurl = "http://h/metrics"\ngpus = [-1]\n',
         "scrape[0].gpus: expected"),
        ("[proxy]\nname = 1\n", "proxy: expected an array of tables ([[proxy]])"),
    ],
)
def test_bad_tables_name_the_key(tmp_path: Path, text: str, named: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(named)):
        load(write(tmp_path, text), environ={})


@pytest.mark.parametrize(("value", "expected"), [('"auto"', "auto"), ("0.02", 0.02), ("1", 1.0)])
def test_prefill_weight_is_auto_or_a_number(tmp_path: Path, value: str, expected: object) -> None:
    config = load(write(tmp_path, f"[attribution]\nprefill_weight = {value}\n"), environ={})
    assert config.attribution.prefill_weight == expected
    with pytest.raises(ConfigError, match=r"attribution\.prefill_weight"):
        load(write(tmp_path, '[attribution]\nprefill_weight = "heavy"\n'), environ={})
    with pytest.raises(ConfigError, match=r"attribution\.prefill_weight"):
        load(environ={"JOULEPROBE_ATTRIBUTION_PREFILL_WEIGHT": "-1"})
