"""The config file: the contract's keys parse, every mistake is one line naming file, key and value."""

from __future__ import annotations

import dataclasses
import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from uploader.config import settings as config
from uploader.config.settings import Config, RetryConfig, Tube
from uploader.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]
SAMPLE = REPO / "config" / "uploader.toml"

# The operator's config block of the producer contract, as deployment tooling writes it.
CONTRACT_TOML = """\
[source]                          # beanstalkd
address = "127.0.0.1:11300"
tubes = ["uploads"]
completion_tube = "uploads-done"
max_active_jobs = 32

[redis]
url = "redis://127.0.0.1:6379/0"
key_prefix = "uploader:"

[upload]
concurrency = 64
allowed_roots = ["/srv/uploads"]
key_template = "{job_id}/{relpath}"
retry = { max_attempts = 5, base = 0.2, cap = 30.0 }

[store]
kind = "local"                    # "local" | "s3" | "http"
local = { root = "/var/lib/uploader/objects" }
s3 = { bucket = "uploads", prefix = "", region = "us-east-1", endpoint_url = "" }

[http]
listen = "127.0.0.1:9464"

[daemon]
drain_timeout = 30.0
"""


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "uploader.toml"
    path.write_text(textwrap.dedent(text))
    return str(path)


def load_text(tmp_path: Path, text: str) -> Config:
    return config.load(write(tmp_path, text))


def test_defaults_are_a_valid_config() -> None:
    assert config.parse({}, "empty.toml") == dataclasses.replace(Config(), path="empty.toml")


def test_an_empty_file_gives_the_defaults(tmp_path: Path) -> None:
    loaded = load_text(tmp_path, "")
    assert dataclasses.replace(loaded, path=Config().path) == Config()
    assert loaded.path == str(tmp_path / "uploader.toml")


def test_the_contract_block_parses_to_its_values(tmp_path: Path) -> None:
    c = load_text(tmp_path, CONTRACT_TOML)

    assert c.source.addresses == ("127.0.0.1:11300",)
    assert c.source.tubes == (Tube("uploads", 1),)
    assert (c.source.completion_tube, c.source.max_active_jobs) == ("uploads-done", 32)
    assert (c.redis.url, c.redis.key_prefix) == ("redis://127.0.0.1:6379/0", "uploader:")
    assert (c.upload.concurrency, c.upload.allowed_roots) == (64, ("/srv/uploads",))
    assert c.upload.key_template == "{job_id}/{relpath}"
    assert c.upload.retry == RetryConfig(max_attempts=5, base=0.2, cap=30.0)
    assert (c.store.kind, c.store.local.root) == ("local", "/var/lib/uploader/objects")
    assert (c.store.s3.bucket, c.store.s3.region, c.store.s3.endpoint_url) == ("uploads", "us-east-1", "")
    assert c.http.listen == "127.0.0.1:9464"
    assert c.daemon.drain_timeout == 30.0


def test_address_may_be_a_list(tmp_path: Path) -> None:
    c = load_text(tmp_path, '[source]\naddress = ["10.0.0.1:11300", "[::1]:11301"]\n')
    assert c.source.addresses == ("10.0.0.1:11300", "[::1]:11301")


def test_tubes_may_mix_names_and_weighted_tables(tmp_path: Path) -> None:
    c = load_text(tmp_path, '[source]\ntubes = ["uploads", { name = "bulk", weight = 3 }, { name = "x" }]\n')
    assert c.source.tubes == (Tube("uploads", 1), Tube("bulk", 3), Tube("x", 1))


def test_store_s3_inline_table(tmp_path: Path) -> None:
    inline = (
        '{ bucket = "media", prefix = "in/", region = "eu-west-1", '
        'endpoint_url = "http://h:9000", addressing_style = "path" }'
    )
    c = load_text(tmp_path, f'[store]\nkind = "s3"\ns3 = {inline}\n')

    assert c.store.kind == "s3"
    s3 = c.store.s3
    assert (s3.bucket, s3.prefix, s3.region, s3.endpoint_url) == ("media", "in/", "eu-west-1", "http://h:9000")
    assert s3.addressing_style == "path"


def test_an_int_is_accepted_where_a_float_is_expected(tmp_path: Path) -> None:
    c = load_text(tmp_path, "[daemon]\ndrain_timeout = 5\n")
    assert c.daemon.drain_timeout == 5.0
    assert isinstance(c.daemon.drain_timeout, float)


# (TOML text, fragments the one-line error must contain after the file name)
BAD: dict[str, tuple[str, tuple[str, ...]]] = {
    "unknown table": ("[sources]\naddress = 'x:1'\n", ("[sources]", "not a known table")),
    "unknown key": ("[source]\nadress = 'h:1'\n", ("[source].adress", "'h:1'")),
    "unknown key in inline table": (
        "[store]\nlocal = { root = '/x', fsnyc = true }\n", ("[store.local].fsnyc", "True")
    ),
    "unknown key in tube table": (
        "[source]\ntubes = [{ name = 'a', wieght = 2 }]\n", ("[source.tubes].wieght", "2")
    ),
    "wrong type": ("[upload]\nconcurrency = '64'\n", ("[upload].concurrency", "integer", "'64'")),
    "wrong type list": ("[upload]\nallowed_roots = '/srv'\n", ("[upload].allowed_roots", "'/srv'")),
    "table expected": ("[upload]\nretry = 5\n", ("[upload.retry]", "table", "5")),
    "bool as int": ("[upload]\nconcurrency = true\n", ("[upload].concurrency", "integer", "True")),
    "bool as float": ("[daemon]\ndrain_timeout = false\n", ("[daemon].drain_timeout", "False")),
    "int as bool": ("[upload]\nallow_hard_links = 1\n", ("[upload].allow_hard_links", "true or false", "1")),
    "zero concurrency": ("[upload]\nconcurrency = 0\n", ("[upload].concurrency", ">= 1", "0")),
    "negative concurrency": ("[upload]\nconcurrency = -3\n", ("[upload].concurrency", ">= 1", "-3")),
    "huge concurrency": ("[upload]\nconcurrency = 1000000\n", ("[upload].concurrency", "<=", "1000000")),
    "zero max_active_jobs": ("[source]\nmax_active_jobs = 0\n", ("[source].max_active_jobs", ">= 1", "0")),
    "nan": ("[daemon]\ndrain_timeout = nan\n", ("[daemon].drain_timeout", "finite", "nan")),
    "address without port": ("[source]\naddress = 'localhost'\n", ("[source].address", "'localhost'")),
    "address port out of range": ("[source]\naddress = 'h:99999'\n", ("[source].address", "'h:99999'")),
    "address list with a number": ("[source]\naddress = ['h:1', 5]\n", ("[source].address", "5")),
    "empty address list": ("[source]\naddress = []\n", ("[source].address", "[]")),
    "bad tube name": ("[source]\ntubes = ['-dash']\n", ("[source].tubes", "'-dash'")),
    "tube name with space": ("[source]\ntubes = ['a b']\n", ("[source].tubes", "'a b'")),
    "tube name too long": ("[source]\ntubes = ['" + "t" * 201 + "']\n", ("[source].tubes", "ttttt")),
    "empty tubes": ("[source]\ntubes = []\n", ("[source].tubes", "[]")),
    "tube table without name": ("[source]\ntubes = [{ weight = 2 }]\n", ("[source].tubes", "''")),
    "zero weight": ("[source]\ntubes = [{ name = 'a', weight = 0 }]\n", ("[source.tubes].weight", "0")),
    "duplicate tube": (
        "[source]\ntubes = ['a', { name = 'a', weight = 2 }]\n", ("[source].tubes", "twice", "'a'")
    ),
    "bad completion tube": ("[source]\ncompletion_tube = 'a b'\n", ("[source].completion_tube", "'a b'")),
    "cap below base": (
        "[upload]\nretry = { base = 2.0, cap = 1.0 }\n", ("[upload.retry].cap", ">= base", "1")
    ),
    "zero max_attempts": ("[upload]\nretry = { max_attempts = 0 }\n", ("[upload.retry].max_attempts", "0")),
    "unknown key_template field": (
        "[upload]\nkey_template = '{job_id}/{path}'\n", ("[upload].key_template", "'{job_id}/{path}'")
    ),
    "key_template attribute": (
        "[upload]\nkey_template = '{job_id.__class__}'\n", ("[upload].key_template", "__class__")
    ),
    "malformed key_template": (
        "[upload]\nkey_template = '{job_id'\n", ("[upload].key_template", "'{job_id'")
    ),
    "relative allowed root": (
        "[upload]\nallowed_roots = ['srv/up']\n", ("[upload].allowed_roots", "'srv/up'")
    ),
    "slash as allowed root": ("[upload]\nallowed_roots = ['/']\n", ("[upload].allowed_roots", "'/'")),
    "no allowed roots": ("[upload]\nallowed_roots = []\n", ("[upload].allowed_roots", "[]")),
    "bad choice": ("[upload]\nskip_existing = 'always'\n", ("[upload].skip_existing", "'always'")),
    "unknown store kind": ("[store]\nkind = 'ftp'\n", ("[store].kind", "'ftp'")),
    "s3 without bucket": (
        "[store]\nkind = 's3'\ns3 = { bucket = '' }\n", ("[store.s3].bucket", "[store].kind", "''")
    ),
    "s3 prefix climbing": ("[store]\ns3 = { prefix = 'a/../b' }\n", ("[store.s3].prefix", "'a/../b'")),
    "s3 half credentials": ("[store]\ns3 = { access_key_id = 'AKIA' }\n", ("[store.s3].secret_access_key",)),
    "relative local root": ("[store]\nlocal = { root = 'objects' }\n", ("[store.local].root", "'objects'")),
    "bad redis url": ("[redis]\nurl = 'http://h:6379'\n", ("[redis].url", "'http://h:6379'")),
    "key prefix with braces": ("[redis]\nkey_prefix = '{up}:'\n", ("[redis].key_prefix", "'{up}:'")),
    "bad listen": ("[http]\nlisten = '9464'\n", ("[http].listen", "'9464'")),
    "bad TOML": ("[source\naddress = 1\n", ("not valid TOML", "line 1")),
    "duplicate TOML key": ("[upload]\nconcurrency = 1\nconcurrency = 2\n", ("not valid TOML",)),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_a_bad_file_is_one_line_naming_file_key_and_value(tmp_path: Path, case: str) -> None:
    text, fragments = BAD[case]
    path = write(tmp_path, text)

    with pytest.raises(ConfigError) as info:
        config.load(path)

    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"{path}: ")
    for fragment in fragments:
        assert fragment in message


def test_unknown_key_in_the_retry_table_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"\[upload\.retry\]\.max_atempts"):
        load_text(tmp_path, "[upload]\nretry = { max_atempts = 3 }\n")


@pytest.mark.parametrize("key", ['tubes = ["up\\n"]', 'completion_tube = "done\\n"'])
def test_a_tube_name_with_a_trailing_newline_is_refused(tmp_path: Path, key: str) -> None:
    with pytest.raises(ConfigError, match=r"\[source\]\.(tubes|completion_tube)"):
        load_text(tmp_path, f"[source]\n{key}\n")


def test_a_missing_file_is_one_line(tmp_path: Path) -> None:
    path = str(tmp_path / "nope.toml")
    with pytest.raises(ConfigError, match=r"^" + path + r": cannot read the config file: No such file"):
        config.load(path)


def test_an_unreadable_file_is_one_line(tmp_path: Path) -> None:
    # Tests may run as root, which reads mode-000 files; a directory is unreadable for anyone.
    with pytest.raises(ConfigError, match=r"^" + str(tmp_path) + r": cannot read the config file: Is a dir"):
        config.load(str(tmp_path))


def test_a_non_utf8_file_is_one_line(tmp_path: Path) -> None:
    path = tmp_path / "uploader.toml"
    path.write_bytes(b"[source]\naddress = '\xff'\n")
    with pytest.raises(ConfigError) as info:
        config.load(str(path))
    assert str(info.value).startswith(f"{path}: ")
    assert "\n" not in str(info.value)


def test_a_password_in_a_bad_redis_url_is_masked_in_the_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_text(tmp_path, "[redis]\nurl = 'http://user:hunter2@h:6379'\n")
    assert "hunter2" not in str(info.value)
    assert "user:***@h:6379" in str(info.value)


# --- the sample file ---


def test_the_sample_file_is_the_defaults() -> None:
    loaded = config.load(str(SAMPLE))
    assert dataclasses.replace(loaded, path=Config().path) == Config()


def _documented_keys(cls: type, prefix: str) -> list[str]:
    """Every TOML key a config dataclass reads, as 'table.key'; nested dataclasses are tables."""
    names = []
    for f in dataclasses.fields(cls):
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        key = "address" if f.name == "addresses" else f.name
        if dataclasses.is_dataclass(default):
            names += _documented_keys(type(default), f"{prefix}{key}.")
        else:
            names.append(prefix + key)
    return names


def test_the_sample_file_sets_every_key() -> None:
    import tomllib

    data = tomllib.loads(SAMPLE.read_text())
    missing = []
    for dotted in _documented_keys(Config, ""):
        if dotted == "path":
            continue
        node: object = data
        for part in dotted.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        if node is None:
            missing.append(dotted)
    assert missing == []


def test_the_sample_file_comments_every_key() -> None:
    lines = SAMPLE.read_text().splitlines()
    for i, line in enumerate(lines):
        if line and not line.startswith(("#", "[", " ")) and "=" in line:
            assert lines[i - 1].startswith("#"), f"no comment above {line!r}"


def _commented_examples() -> list[tuple[str, str]]:
    """(table, 'key = value') for each commented-out example line of the sample file.

    A commented `[table]` line opens a table for the examples below it; an example named like
    the table it sits in (`retry = {...}` under [upload.retry]) belongs to the parent table.
    """
    examples = []
    section = ""
    for line in SAMPLE.read_text().splitlines():
        if header := re.match(r"^#?\s*\[([a-z0-9_.]+)\]\s*$", line):
            section = header.group(1)
        elif example := re.match(r"^#\s+([A-Za-z_][A-Za-z0-9_]*) = (.+)$", line):
            key = example.group(1)
            table = section.rsplit(".", 1)[0] if section.rsplit(".", 1)[-1] == key else section
            examples.append((table, f"{key} = {example.group(2)}"))
    return examples


def test_the_sample_files_commented_examples_parse(tmp_path: Path) -> None:
    examples = _commented_examples()
    keys = {line.split(" ")[0] for _, line in examples}
    assert {"address", "tubes", "s3", "kind", "retry", "headers"} <= keys

    for table, line in examples:
        load_text(tmp_path, f"[{table}]\n{line}\n")  # raises ConfigError naming the line


# --- SIGHUP: what a reload applies, and what waits for a restart ---


def test_a_reload_applies_the_live_keys_and_names_no_table() -> None:
    old = config.parse({"upload": {"concurrency": 8}}, "a.toml")
    fresh = config.parse(
        {
            "upload": {"concurrency": 16, "adaptive": False, "min_concurrency": 2},
            "daemon": {"log_level": "debug", "log_format": "json"},
            "http": {"token": "new-token"},
            "limits": {"files_per_second": 5},
        },
        "a.toml",
    )

    reload = config.reloaded(old, fresh)

    assert reload.restart == ()
    assert reload.config == dataclasses.replace(fresh, path="a.toml")


def test_a_reload_keeps_a_restart_only_change_and_names_its_table() -> None:
    old = config.parse({"upload": {"allowed_roots": ["/srv/a"]}}, "a.toml")
    fresh = config.parse(
        {"upload": {"allowed_roots": ["/srv/b"], "concurrency": 9}, "redis": {"key_prefix": "other:"}},
        "a.toml",
    )

    reload = config.reloaded(old, fresh)

    assert reload.restart == ("redis", "upload")
    assert reload.config.upload.allowed_roots == ("/srv/a",)
    assert reload.config.upload.concurrency == 9
    assert reload.config.redis == old.redis


def test_a_reload_never_names_the_path() -> None:
    old, fresh = Config(path="old.toml"), Config(path="new.toml")

    reload = config.reloaded(old, fresh)

    assert reload.restart == ()
    assert reload.config.path == "old.toml"


# --- check-config ---


def check_config(path: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "uploader.cli.main", "check-config", path],
        capture_output=True, text=True, timeout=30, cwd=REPO, check=False,
    )


def test_check_config_prints_json_with_secrets_masked(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
        [redis]
        url = "redis://:redispass123@127.0.0.1:6379/0"
        [store]
        kind = "s3"
        [store.s3]
        bucket = "b"
        access_key_id = "AKIAKEYID"
        secret_access_key = "s3cretkey"
        session_token = "sessiontok"
        [store.http.headers]
        Authorization = "Bearer hdrsecret9"
        [http]
        token = "httptoken42"
        """,
    )

    done = check_config(path)

    assert done.returncode == 0, done.stderr
    for secret in ("redispass123", "AKIAKEYID", "s3cretkey", "sessiontok", "httptoken42", "hdrsecret9"):
        assert secret not in done.stdout + done.stderr
    shown = json.loads(done.stdout)
    assert shown["redis"]["url"] == "redis://:***@127.0.0.1:6379/0"
    assert shown["store"]["s3"]["secret_access_key"] == "***"
    assert shown["http"]["token"] == "***"
    assert shown["store"]["s3"]["bucket"] == "b"
    assert shown["upload"]["concurrency"] == 64


def test_check_config_on_a_bad_file_exits_2_with_one_line(tmp_path: Path) -> None:
    path = write(tmp_path, "[upload]\nconcurrency = 0\n")

    done = check_config(path)

    assert done.returncode == 2
    assert done.stdout == ""
    assert done.stderr.count("\n") == 1
    assert f"{path}: [upload].concurrency must be >= 1, got 0" in done.stderr
