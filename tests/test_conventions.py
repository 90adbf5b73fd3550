"""The conventions PostgreSQL users check first: META.json for PGXN, one version everywhere.

META.json (ext/, the PGXN distribution: its Makefile is the PGXS one) is checked against the PGXN
Meta Spec 1.0 (https://pgxn.org/spec/): the required keys and the form of each value, and its
versions equal the control file's default_version. (The pg_regress suite that pins the SQL
contract runs in test_foundation.py; the -Wall -Wextra -Werror build is every build of `make test`:
its Makefile passes COPT; the harnesses under the sanitizers are in test_sanitizers.py.)
"""

from __future__ import annotations

import json
import re

from .conftest import EXT_VERSION, REPO

META = REPO / "ext" / "META.json"
SEMVER = re.compile(r"^(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)(-[0-9A-Za-z-]+(\.[0-9A-Za-z-]+)*)?$")
# the spec's license strings
LICENSES = {"agpl_3", "apache_1_1", "apache_2_0", "artistic_1", "artistic_2", "bsd", "freebsd", "gfdl_1_2",
            "gfdl_1_3", "gpl_1", "gpl_2", "gpl_3", "lgpl_2_1", "lgpl_3_0", "mit", "mozilla_1_0", "mozilla_1_1",
            "openssl", "perl_5", "postgresql", "qpl_1_0", "ssleay", "sun", "zlib", "open_source", "restricted",
            "unrestricted", "unknown"}
PHASES = {"configure", "build", "test", "runtime", "develop"}
RELATIONS = {"requires", "recommends", "suggests", "conflicts"}


def is_term(s) -> bool:
    """A term: at least two characters, none of them a space, slash, backslash or colon."""
    return isinstance(s, str) and len(s) >= 2 and not re.search(r"[\s/\\:]", s)


def pgxn_errors(meta: dict) -> list[str]:
    errors = []
    for key in ("name", "version", "abstract", "maintainer", "license", "provides", "meta-spec"):
        if key not in meta:
            errors.append(f"missing {key}")
    for key in meta:
        if key not in {"name", "version", "abstract", "maintainer", "license", "provides", "meta-spec",
                       "description", "generated_by", "tags", "no_index", "prereqs", "release_status",
                       "resources"} and not re.match(r"^[xX]_.", key):
            errors.append(f"unknown key {key}")
    if not is_term(meta.get("name")):
        errors.append("name is not a term")
    if not SEMVER.match(str(meta.get("version", ""))):
        errors.append("version is not SemVer")
    if not isinstance(meta.get("abstract"), str) or not meta["abstract"]:
        errors.append("abstract is empty")
    maintainer = meta.get("maintainer")
    if not (isinstance(maintainer, str) and maintainer) and not (
            isinstance(maintainer, list) and maintainer and all(isinstance(m, str) and m for m in maintainer)):
        errors.append("maintainer is not a string or a list of strings")
    if meta.get("license") not in LICENSES and not isinstance(meta.get("license"), dict):
        errors.append("license is not one of the spec's")
    provides = meta.get("provides")
    if not isinstance(provides, dict) or not provides:
        errors.append("provides is empty")
    for name, ext in (provides or {}).items():
        if not is_term(name):
            errors.append(f"provides: {name} is not a term")
        if set(ext) - {"file", "version", "abstract", "docfile"} or not {"file", "version"} <= set(ext):
            errors.append(f"provides: {name} needs file and version, and nothing but abstract and docfile")
        if not SEMVER.match(str(ext.get("version", ""))):
            errors.append(f"provides: {name}'s version is not SemVer")
        if not (META.parent / ext.get("file", "")).is_file():
            errors.append(f"provides: {name}'s file {ext.get('file')} is not in the distribution")
    for phase, relations in meta.get("prereqs", {}).items():
        if phase not in PHASES or set(relations) - RELATIONS:
            errors.append(f"prereqs: unknown phase or relation in {phase}")
        for prereqs in relations.values():
            for name, version in prereqs.items():
                if not is_term(name) and name != "PostgreSQL" or not (version == 0 or SEMVER.match(str(version))):
                    errors.append(f"prereqs: {name} {version}")
    if meta.get("release_status", "stable") not in ("stable", "testing", "unstable"):
        errors.append("release_status")
    if not re.match(r"^1\.0\.\d+$", str(meta.get("meta-spec", {}).get("version", ""))):
        errors.append("meta-spec version is not 1.0.x")
    return errors


def test_meta_json_follows_the_pgxn_spec():
    assert pgxn_errors(json.loads(META.read_text())) == []


def test_the_validator_refuses_what_the_spec_refuses():
    meta = json.loads(META.read_text())
    assert pgxn_errors({**meta, "version": "0.3"}) == ["version is not SemVer"]
    assert pgxn_errors({**meta, "license": "MIT License"}) == ["license is not one of the spec's"]
    assert pgxn_errors({k: v for k, v in meta.items() if k != "abstract"})[0] == "missing abstract"
    assert pgxn_errors({**meta, "name": "pg llm"}) == ["name is not a term"]


def test_meta_json_versions_are_the_control_files():
    meta = json.loads(META.read_text())
    assert meta["version"] == EXT_VERSION
    assert {ext["version"] for ext in meta["provides"].values()} == {EXT_VERSION}
    # the oldest PostgreSQL it names is the one pg_llm.h builds for
    header = (REPO / "ext" / "src" / "pg_llm.h").read_text()
    oldest = int(re.search(r"PG_LLM_MIN_PG_VERSION_NUM (\d+)", header).group(1)) // 10000
    assert meta["prereqs"]["runtime"]["requires"]["PostgreSQL"] == f"{oldest}.0.0"


def signatures(conn) -> list[str]:
    return [r[0] for r in conn.execute(
        "SELECT p.oid::regprocedure::text || ' ' || pg_get_function_result(p.oid) FROM pg_proc p "
        "JOIN pg_depend d ON d.classid = 'pg_proc'::regclass AND d.objid = p.oid AND d.deptype = 'e' "
        "JOIN pg_extension e ON e.oid = d.refobjid AND e.extname = 'pg_llm' ORDER BY 1")]


def test_the_update_scripts_from_0_1_0_on_this_server(conn):
    """CREATE EXTENSION pg_llm VERSION '0.1.0' then ALTER EXTENSION ... UPDATE, with this server's
    build: the released scripts and every upgrade run on each PostgreSQL version make test uses
    (test_upgrade.py also updates a database filled by 0.1.0's own library, where that builds)."""
    fresh = signatures(conn)
    conn.execute("DROP EXTENSION pg_llm")
    conn.execute("CREATE EXTENSION pg_llm VERSION '0.1.0'")
    conn.execute("ALTER EXTENSION pg_llm UPDATE")
    assert conn.execute("SELECT extversion FROM pg_extension WHERE extname = 'pg_llm'").fetchone()[0] == EXT_VERSION
    assert signatures(conn) == fresh
