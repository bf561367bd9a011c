"""Configuration: precedence, validation with one line per problem, exit code 2."""

import subprocess
import sys

import pytest

from mkv import config


def load(argv):
    return config.load(argv)[0]


def test_example_config_parses_with_every_option(tmp_path):
    cfg = load(["--config", "etc/mkv.conf", "--db", str(tmp_path / "i.db")])
    assert cfg.volumes == ("localhost:3001", "localhost:3002", "localhost:3003")
    assert cfg.replicas == 3 and cfg.max_key_bytes == 1024
    assert cfg.writer_socket == str(tmp_path / "i.db") + ".writer.sock"
    options = {a.dest for a in config.build_parser("mkv", "").\
               _actions if a.dest not in ("help", "config")}
    text = open("etc/mkv.conf").read()
    for dest in options:
        assert f"\n{dest.replace('_', '-')} =" in text, f"etc/mkv.conf lacks {dest}"


def test_precedence_flag_over_env_over_file(tmp_path, monkeypatch):
    conf = tmp_path / "mkv.conf"
    conf.write_text(f"volumes = a:1,b:2,c:3\nreplicas = 1\ndb = {tmp_path}/i.db\nport = 4000\n")
    assert load(["--config", str(conf)]).port == 4000
    monkeypatch.setenv("MKV_PORT", "4001")
    assert load(["--config", str(conf)]).port == 4001
    assert load(["--config", str(conf), "--port", "4002"]).port == 4002
    monkeypatch.setenv("MKV_CONFIG", str(conf))
    assert load([]).replicas == 1


def test_protect_and_md5_booleans(tmp_path):
    base = ["--volumes", "a:1", "--replicas", "1", "--db", str(tmp_path / "i.db")]
    assert load(base + ["--protect", "true", "--md5", "off"]).protect is True
    assert load(base + ["--md5", "off"]).md5 is False


def run_serve(*args):
    return subprocess.run([sys.executable, "-m", "mkv", "serve", *args],
                          capture_output=True, text=True, timeout=30)


def test_every_problem_is_reported_and_exits_2(tmp_path):
    r = run_serve("--volumes", "a:1,b:99999,a:1", "--replicas", "5", "--db", "/no/such/dir/i.db",
                  "--port", "0")
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert any("b:99999" in line for line in lines)
    assert any("listed twice" in line for line in lines)
    assert any("replicas" in line for line in lines)
    assert any("/no/such/dir" in line for line in lines)
    assert any(line.startswith("mkv serve: config: port") for line in lines)


def test_unknown_option_and_unknown_config_key_exit_2(tmp_path):
    assert run_serve("--volumes", "a:1", "--nonsense", "1").returncode == 2
    conf = tmp_path / "bad.conf"
    conf.write_text("volumes = a:1\nnot-an-option = 3\n")
    r = run_serve("--config", str(conf), "--replicas", "1", "--db", str(tmp_path / "i.db"))
    assert r.returncode == 2 and "not-an-option" in r.stderr


def test_unwritable_db_dir(tmp_path):
    """/proc/self is a directory nobody, root included, can create files in."""
    with pytest.raises(config.ConfigError) as e:
        config.validate(config.build_parser("mkv", "").parse_args(
            ["--volumes", "a:1", "--replicas", "1", "--db", "/proc/self/i.db"]))
    assert "not writable" in str(e.value)


def test_no_volumes_and_long_socket_path(tmp_path):
    with pytest.raises(config.ConfigError) as e:
        config.validate(config.build_parser("mkv", "").parse_args(["--db", str(tmp_path / "i.db")]))
    assert "volumes" in str(e.value)
    long_dir = tmp_path / ("d" * 100)
    long_dir.mkdir()
    with pytest.raises(config.ConfigError) as e:
        config.validate(config.build_parser("mkv", "").parse_args(
            ["--volumes", "a:1", "--replicas", "1", "--db", str(long_dir / "i.db")]))
    assert "writer-socket" in str(e.value)


def test_replicas_count_failure_domains_not_volumes(tmp_path):
    with pytest.raises(config.ConfigError) as e:
        config.validate(config.build_parser("mkv", "").parse_args(
            ["--volumes", "h:1/d1,h:1/d2", "--replicas", "2", "--db", str(tmp_path / "i.db")]))
    assert "failure domains" in str(e.value)
