"""Configuration: precedence, validation with one line per problem, exit code 2; one
shared file for every command, switches only from the command line, the default file,
--version, and `mkv volume`'s own keys."""

import importlib.metadata
import os
import re
import subprocess
import sys

import pytest
import requests

from mkv import cli, config
from mkv.index import schema
from mkv.model import Record, State
from mkv.tools import backup, rebalance, rebuild, scrub
from tests.cluster import free_port, wait_http
from tests.helpers import roundtrip, rows


def load(argv):
    return config.load(argv)[0]


def parser_of(command):
    """Each command's parser, built the way the command builds it."""
    if command == "mkv volume":
        return cli.volume_parser()
    parser = config.build_parser(command, "")
    extend = {"mkv-rebuild": rebuild.add_arguments, "mkv-rebalance": rebalance.add_arguments,
              "mkv backup": backup.add_arguments, "mkv-scrub": scrub.add_arguments}
    if command in extend:
        extend[command](parser)
    return parser


COMMANDS = ("mkv serve", "mkv volume", "mkv-rebuild", "mkv-rebalance", "mkv backup", "mkv-scrub")
SHARED = set(config.build_parser("mkv", "").file_keys())


def test_example_config_parses_with_every_option(tmp_path):
    cfg = load(["--config", "etc/mkv.conf", "--db", str(tmp_path / "i.db")])
    assert cfg.volumes == ("localhost:3001", "localhost:3002", "localhost:3003")
    assert cfg.replicas == 3 and cfg.max_key_bytes == 1024
    assert cfg.writer_socket == str(tmp_path / "i.db") + ".writer.sock"
    options = {a.dest for a in config.build_parser("mkv", "").\
               _actions if a.dest not in ("help", "config", "version")}
    text = open("etc/mkv.conf").read()
    for dest in options:
        assert f"\n{dest.replace('_', '-')} =" in text, f"etc/mkv.conf lacks {dest}"
    # the options of only some commands are there too, commented out (their defaults differ
    # between the tools, or there is none); the command-line-only switches are not settings
    for key in set(config.COMMAND_KEYS) - config.COMMAND_LINE_ONLY:
        assert f"\n# {key} =" in text, f"etc/mkv.conf lacks {key}"
    for key in config.COMMAND_LINE_ONLY:
        assert not re.search(rf"^#? *{key} *=", text, re.M), f"etc/mkv.conf sets {key}"
        assert f"--{key}" in text, f"etc/mkv.conf does not say where {key} goes"


def test_the_table_of_command_keys_is_each_commands_parser():
    """COMMAND_KEYS (what one command ignores as another's) is what the parsers have."""
    for command in COMMANDS:
        own = set(parser_of(command).file_keys())
        expected = {k for k, cmds in config.COMMAND_KEYS.items() if command in cmds}
        assert own - SHARED == expected, command
        # all of the shared ones, or the few SHARED_SUBSETS names (mkv volume's secret)
        assert own & SHARED == config.SHARED_SUBSETS.get(command, SHARED), command
    assert not set(config.COMMAND_KEYS) & SHARED
    assert set(config.SHARED_SUBSETS) <= set(COMMANDS)


def test_every_command_accepts_the_example_file(tmp_path):
    (tmp_path / "v").mkdir()
    for command in COMMANDS:
        parser = parser_of(command)
        dest = [str(tmp_path / "copy.db")] if command == "mkv backup" else []
        ns = config.parse(parser, ["--config", "etc/mkv.conf", "--db", str(tmp_path / "i.db"), *dest]
                          if command != "mkv volume" else
                          ["--config", "etc/mkv.conf", "--root", str(tmp_path / "v"), "--port", "1"])
        assert parser.problems == [], (command, parser.problems)
        if command != "mkv volume":
            config.validate(ns)


def shared_file(tmp_path, *lines):
    conf = tmp_path / "shared.conf"
    conf.write_text("\n".join(["volumes = a:1,b:2,c:3", f"db = {tmp_path}/i.db",
                               "concurrency = 7", "limit-rate = 1000", "verify = true",
                               "quiet = true", f"volume-root = {tmp_path}/vol",
                               "volume-port = 3999", "volume-bind = 127.0.0.2",
                               "port = 4000", "bind = 127.0.0.3", *lines]) + "\n")
    return conf


def test_one_shared_file_each_command_takes_its_own_keys(tmp_path):
    conf = shared_file(tmp_path)
    cfg, _ = config.load(["--config", str(conf)], prog="mkv serve")
    assert (cfg.port, cfg.bind, cfg.volumes) == (4000, "127.0.0.3", ("a:1", "b:2", "c:3"))
    _, ns = config.load(["--config", str(conf)], extend=rebalance.add_arguments)
    assert (ns.concurrency, ns.limit_rate, ns.verify, ns.quiet) == (7, 1000.0, True, True)
    _, ns = config.load(["--config", str(conf)], extend=rebuild.add_arguments)
    assert (ns.concurrency, ns.no_progress, ns.force) == (7, True, False)
    parser = cli.volume_parser()
    ns = config.parse(parser, ["--config", str(conf)])
    assert parser.problems == []
    assert (str(ns.root), ns.port, ns.bind) == (f"{tmp_path}/vol", 3999, "127.0.0.2")


def test_the_service_starts_on_a_file_with_the_tools_options(volumes, make_service, tmp_path):
    """The shared file, tools' keys and all (even another command's switch), starts
    `mkv serve`: it was refused for `concurrency = 4`."""
    conf = shared_file(tmp_path, "force = yes", "dry-run = true")
    svc = make_service(volumes, extra=["--config", str(conf)])
    roundtrip(svc.url, "/shared-file")


def test_a_key_no_command_has_is_refused_by_every_command_with_a_hint(tmp_path):
    conf = shared_file(tmp_path, "concurency = 3")
    for argv in ([sys.executable, "-m", "mkv", "serve"], [sys.executable, "-m", "mkv", "volume"],
                 [sys.executable, "-m", "mkv.tools.rebuild"],
                 [sys.executable, "-m", "mkv.tools.rebalance"]):
        r = subprocess.run([*argv, "--config", str(conf)], capture_output=True, text=True,
                           timeout=30)
        assert r.returncode == 2, (argv, r.stderr)
        assert f"config: concurency: no mkv command has this option ({conf}); did you mean " \
               "concurrency?" in r.stderr, (argv, r.stderr)


def test_force_and_dry_run_only_from_the_command_line(volumes, tmp_path):
    """MKV_FORCE=yes used to turn on --force unseen; from the environment or the file the
    switches are refused, and nothing is done."""
    (tmp_path / "idx").mkdir()
    db = tmp_path / "idx" / "i.db"
    vols = ",".join(v.address for v in volumes)
    base = ["--volumes", vols, "--replicas", "1", "--db", str(db)]
    # an index with a key, which a forced rebuild of the empty volumes would replace
    conn = schema.open_index(str(db))
    with conn:
        schema.write_records(conn, [Record("/old", State.LIVE, ("x:1",), 1, "", 1.0)])
    conn.close()
    before = db.read_bytes()

    def run(module, *args, env=None, **kw):
        return subprocess.run([sys.executable, "-m", module, *base, *args], capture_output=True,
                              text=True, timeout=60, env={**os.environ, **(env or {})}, **kw)

    r = run("mkv.tools.rebuild", env={"MKV_FORCE": "yes"})
    assert r.returncode == 2
    assert "force: only on the command line (--force), not from MKV_FORCE" in r.stderr
    conf = tmp_path / "force.conf"
    conf.write_text("force = true\n")
    r = run("mkv.tools.rebuild", "--config", str(conf))
    assert r.returncode == 2 and f"force: only on the command line (--force), not in {conf}" \
        in r.stderr
    assert db.read_bytes() == before and set(rows(db)) == {"/old"}

    r = run("mkv.tools.rebalance", env={"MKV_DRY_RUN": "1"})
    assert r.returncode == 2 and "dry-run: only on the command line (--dry-run)" in r.stderr
    conf.write_text("dry-run = yes\n")
    r = run("mkv.tools.rebalance", "--config", str(conf))
    assert r.returncode == 2 and f"dry-run: only on the command line (--dry-run), not in {conf}" \
        in r.stderr

    # on the command line they work as before
    r = run("mkv.tools.rebalance", "--dry-run")
    assert r.returncode == 0 and "dry run: 1 keys" in r.stdout, r.stderr
    r = run("mkv.tools.rebuild", "--force")
    assert r.returncode == 0, r.stderr
    assert rows(db) == {}


def test_the_default_file_is_read_only_when_none_is_named(tmp_path, monkeypatch):
    default = tmp_path / "etc-mkv.conf"
    default.write_text(f"volumes = a:1\nreplicas = 1\ndb = {tmp_path}/i.db\nport = 4100\n")
    other = tmp_path / "other.conf"
    other.write_text(f"volumes = b:2\nreplicas = 1\ndb = {tmp_path}/i.db\n")
    monkeypatch.setattr(config, "DEFAULT_CONFIG", str(default))
    monkeypatch.delenv("MKV_CONFIG")
    assert load([]).port == 4100
    named = load(["--config", str(other)])
    assert named.volumes == ("b:2",) and named.port == 3000  # nothing of the default file
    monkeypatch.setenv("MKV_CONFIG", str(other))
    assert load([]).port == 3000
    monkeypatch.setenv("MKV_CONFIG", "")  # no file at all
    with pytest.raises(SystemExit):
        load([])
    assert load(["--volumes", "c:3", "--replicas", "1", "--db", str(tmp_path / "i.db")]).port == 3000
    monkeypatch.setattr(config, "DEFAULT_CONFIG", str(tmp_path / "missing.conf"))
    monkeypatch.delenv("MKV_CONFIG")
    assert load(["--volumes", "c:3", "--replicas", "1", "--db", str(tmp_path / "i.db")]).port == 3000


def test_every_command_has_version_from_the_package_metadata():
    version = importlib.metadata.version("mkv")
    for argv, prog in ((["mkv"], "mkv"), (["mkv", "serve"], "mkv serve"),
                       (["mkv", "volume"], "mkv volume"), (["mkv.tools.rebuild"], "mkv-rebuild"),
                       (["mkv.tools.rebalance"], "mkv-rebalance"), (["mkv.tools.scrub"], "mkv-scrub")):
        r = subprocess.run([sys.executable, "-m", *argv, "--version"], capture_output=True,
                           text=True, timeout=30)
        assert (r.returncode, r.stdout) == (0, f"{prog} {version}\n"), (argv, r.stderr)


def test_mkv_volume_reads_the_file_and_the_environment_under_its_own_names(tmp_path):
    """volume-port in the file, MKV_VOLUME_ROOT in the environment; the service's port
    and bind in the same file are not the volume's."""
    port = free_port()
    conf = tmp_path / "mkv.conf"
    conf.write_text(f"volume-port = {port}\nport = 1\nbind = 10.9.9.9\nvolumes = a:1\n")
    root = tmp_path / "from-env"
    env = {**os.environ, "MKV_VOLUME_ROOT": str(root)}
    proc = subprocess.Popen([sys.executable, "-m", "mkv", "volume", "--config", str(conf)],
                            env=env, start_new_session=True, stderr=subprocess.PIPE)
    try:
        wait_http(f"http://127.0.0.1:{port}/-/ping")
        assert requests.put(f"http://127.0.0.1:{port}/ab/cd/x", data=b"1").status_code == 201
        assert (root / "ab" / "cd" / "x").read_bytes() == b"1"
    finally:
        proc.terminate()
        assert proc.wait(10) == 0
    # flags win over both, exactly as before
    flag_port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "mkv", "volume", "--config", str(conf),
                             "--root", str(tmp_path / "flag"), "--port", str(flag_port)],
                            env=env, start_new_session=True)
    try:
        wait_http(f"http://127.0.0.1:{flag_port}/-/ping")
        assert requests.put(f"http://127.0.0.1:{flag_port}/ab/cd/y", data=b"2").status_code == 201
        assert (tmp_path / "flag" / "ab" / "cd" / "y").read_bytes() == b"2"
    finally:
        proc.terminate()
        assert proc.wait(10) == 0
    r = subprocess.run([sys.executable, "-m", "mkv", "volume", "--port", "1"],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and "--root" in r.stderr


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


# --- volumes entries: weight, zone, host (mkv.fleet; docs/design.md, "Placement") ----------


def validated(tmp_path, volumes, replicas=2):
    return config.validate(config.build_parser("mkv", "").parse_args(
        ["--volumes", volumes, "--replicas", str(replicas), "--db", str(tmp_path / "i.db")]))


def test_volume_entries_carry_weight_zone_and_host_beside_the_public_url(tmp_path):
    cfg = validated(tmp_path, "10.0.0.5:3001=https://vol1.example.com;weight=2;zone=A,"
                              "10.0.0.5:3002;ZONE=a;host=Rack1-n5, 10.0.0.6:3001/d1;zone=b")
    assert cfg.volumes == ("10.0.0.5:3001", "10.0.0.5:3002", "10.0.0.6:3001/d1")
    assert cfg.public_urls == (("10.0.0.5:3001", "https://vol1.example.com"),)
    assert cfg.weights == (("10.0.0.5:3001", 2.0),)
    # names are case-blind; a host defaults to the address's once any entry has an attribute
    assert cfg.domains == (("10.0.0.5:3001", "a", "10.0.0.5"), ("10.0.0.5:3002", "a", "rack1-n5"),
                           ("10.0.0.6:3001/d1", "b", "10.0.0.6"))
    ring = cfg.ring()
    assert ring.weights["10.0.0.5:3001"] == 2.0 and ring.site("10.0.0.5:3002") == ("a", "rack1-n5")
    plain = validated(tmp_path, "10.0.0.5:3001,10.0.0.5:3002")
    assert plain.weights == () and plain.domains == ()  # as placed before: host:port is the host
    assert plain.ring().site("10.0.0.5:3002") == ("", "10.0.0.5:3002")


def test_the_file_and_the_environment_take_the_same_entries(tmp_path, monkeypatch):
    conf = tmp_path / "mkv.conf"
    conf.write_text("volumes = a.example:1;weight=4;zone=x, b.example:2;zone=y  ; a comment\n"
                    f"replicas = 2\ndb = {tmp_path / 'i.db'}\n")
    cfg = load(["--config", str(conf)])
    assert cfg.weights == (("a.example:1", 4.0),)
    assert [z for _, z, _ in cfg.domains] == ["x", "y"]
    monkeypatch.setenv("MKV_VOLUMES", "a.example:1;host=h,b.example:2;weight=0.5")
    assert load(["--config", str(conf)]).weights == (("b.example:2", 0.5),)


@pytest.mark.parametrize(("volumes", "problem"), [
    ("a:1;weight=0,b:2", "weight '0' must be a number from 0.1 to 20"),
    ("a:1;weight=21,b:2", "from 0.1 to 20"),
    ("a:1;weight=nan,b:2", "from 0.1 to 20"),
    ("a:1;weight=two,b:2", "from 0.1 to 20"),
    ("a:1;wieght=2,b:2", "did you mean weight=?"),
    ("a:1;rack=r1,b:2", "is not one of weight=, zone=, host="),
    ("a:1;weight,b:2", "is not one of"),
    ("a:1;zone=a;zone=b,b:2", "zone= is given twice"),
    ("a:1;zone=,b:2;zone=b", "zone '' must be 1 to 63"),
    ("a:1;host=a/b,b:2", "host 'a/b' must be 1 to 63"),
    ("a:1;zone=x,b:2", "zone= is given for some volumes but not for b:2"),
    ("h:1/d1;host=x,h:1/d2;host=y,g:1", "h:1 is one nginx, so one host"),
    ("h:1;zone=a,h:2;zone=b", "host 'h' is in one zone"),
    ("a:1=ftp://x;weight=2,b:2", "must be http:// or https://"),
    (";weight=2,b:2", "bad volume ''"),
])
def test_bad_entries_are_refused_with_a_line_naming_them(tmp_path, volumes, problem):
    with pytest.raises(config.ConfigError) as e:
        validated(tmp_path, volumes)
    assert any(problem in line and line.startswith("volumes: ") for line in e.value.problems), \
        e.value.problems


def test_a_bad_entry_exits_2_from_every_command_that_places(tmp_path):
    for module in ("mkv", "mkv.tools.rebalance", "mkv.tools.rebuild"):
        argv = [sys.executable, "-m", module, *(["serve"] if module == "mkv" else []),
                "--volumes", "a:1;weight=-1,b:2", "--replicas", "1", "--db", str(tmp_path / "i.db")]
        r = subprocess.run(argv, capture_output=True, text=True, timeout=30,
                           env={**os.environ, "MKV_CONFIG": ""})
        assert r.returncode == 2 and "weight '-1'" in r.stderr, (module, r.stderr)


def test_repair_rate_and_scrub_interval(tmp_path):
    base = ["--volumes", "a:1,b:2,c:3", "--db", str(tmp_path / "i.db")]
    cfg = load(base)
    assert cfg.repair_rate == 20e6 and cfg.scrub_interval == 0
    cfg = load([*base, "--repair-rate", "0", "--scrub-interval", "3600"])
    assert cfg.repair_rate == 0 and cfg.scrub_interval == 3600
    with pytest.raises(SystemExit):
        load([*base, "--repair-rate", "-1"])
    with pytest.raises(SystemExit):
        load([*base, "--scrub-interval", "-5"])
