"""Imports go one way (DESIGN.md "Layout"); this test is the rule's enforcement."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OURS = ("statemachine", "cluster", "api", "indexer", "disaster_recovery", "jepsen")

# package -> packages of ours it may import
ALLOWED = {
    "statemachine": set(),
    "api": {"statemachine"},
    "indexer": {"statemachine"},
    "cluster": {"statemachine", "api", "indexer"},
    "disaster_recovery": {"statemachine", "cluster", "api"},
    # jepsen acts like a user: api.sdk only, cluster.launcher (it starts local clusters as
    # `cluster up` does, in network namespaces of its own) and cluster.workload (the shared
    # workloads, which themselves use only those two); the log it replays comes through the
    # CLI (`backup log`), not from the cluster's internals.
    "jepsen": {"statemachine", "api", "cluster"},
}
# What the SDK (api/sdk/) may import besides itself and the standard library: its own
# dependencies, none of the server's (quart, hypercorn, pysyncobj, ...).
# msgpack: the node snapshot of `GET /v1/admin/snapshot` (api/sdk/snapshot.py).
SDK_DEPENDENCIES = {"httpx", "anyio", "wsproto", "orjson", "msgpack"}
# What the node's side of api/ may take from the SDK: the wire format, never a client.
# The wire format: the codec, the signing, and the shape of a command's answer (answers.py).
WIRE_FORMAT = {"api.sdk.codec", "api.sdk.signing", "api.sdk.answers", "api.sdk.snapshot"}


def _imports(path: Path) -> list[tuple[str, int]]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.module, node.lineno))
    return found


def _imports_resolved(path: Path) -> list[tuple[str, int]]:
    """Every import of `path` as an absolute module name, relative ones resolved."""
    package = list(path.relative_to(ROOT).parts[:-1])  # a module's, or an __init__'s own
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            module = ".".join([*base, *([node.module] if node.module else [])])
            if node.module:
                found.append((module, node.lineno))
            else:  # from . import x: each name is a module of the package
                found += [(f"{module}.{alias.name}", node.lineno) for alias in node.names]
    return found


def _sources(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


def test_every_package_is_checked() -> None:
    for package in OURS:
        assert (ROOT / package / "__init__.py").exists(), package


# Narrower grants than ALLOWED's: (a package's sub-package, what it may import). The chain
# watcher credits deposits as any client of the cluster would, through the SDK's admin client
# (ADR 0010); the rest of indexer/ stays beside api/, importing none of it.
CLIENT_SIDE = {("indexer/chain", "api.sdk")}


def test_imports_flow_one_way() -> None:
    wrong = []
    for package in OURS:
        for path in _sources(package):
            where = str(path.relative_to(ROOT).parent)
            for module, line in _imports(path):
                top = module.split(".")[0]
                granted = any(
                    (where == sub or where.startswith(sub + "/"))
                    and (module == target or module.startswith(target + "."))
                    for sub, target in CLIENT_SIDE
                )
                if top in OURS and top != package and top not in ALLOWED[package] and not granted:
                    wrong.append(f"{path.relative_to(ROOT)}:{line} imports {module}")
    assert not wrong, "imports against the layering of DESIGN.md:\n" + "\n".join(wrong)


# What a user of the cluster has: the SDK, the local launcher, and the workloads built on them.
USER_SIDE = {"cluster.launcher", "cluster.workload"}


def _user_side_only(paths: list[Path]) -> list[str]:
    return [
        f"{path.relative_to(ROOT)}:{line} imports {module}"
        for path in paths
        for module, line in _imports_resolved(path)
        if (module.startswith("api") and not module.startswith("api.sdk"))
        or (module.startswith("cluster") and module not in USER_SIDE)
        or module.split(".")[0] in ("indexer", "disaster_recovery")
    ]


def test_jepsen_uses_only_the_client_of_api_and_the_launcher() -> None:
    wrong = _user_side_only(_sources("jepsen"))
    assert not wrong, "\n".join(wrong)


def test_the_workloads_use_only_what_a_user_has() -> None:
    """cluster/workload.py (loadgen's, the drills', the benchmarks', the harness's) talks to a
    cluster as a user does: the SDK and the launcher, nothing of the node."""
    wrong = _user_side_only([ROOT / "cluster" / "workload.py"])
    assert not wrong, "\n".join(wrong)


def test_the_sdk_imports_only_itself_and_its_dependencies() -> None:
    """api/sdk/ imports nothing of the server side (DESIGN.md "Layout"): only api.sdk.*, the
    standard library and the SDK's own dependencies. The node imports the wire format from
    the SDK, never the other way round."""
    sources = sorted((ROOT / "api" / "sdk").rglob("*.py"))
    assert sources
    wrong = [
        f"{path.relative_to(ROOT)}:{line} imports {module}"
        for path in sources
        for module, line in _imports_resolved(path)
        if not (
            module == "api.sdk"
            or module.startswith("api.sdk.")
            or module.split(".")[0] in sys.stdlib_module_names
            or module.split(".")[0] in SDK_DEPENDENCIES
        )
    ]
    assert not wrong, "the SDK imports beyond the wire format:\n" + "\n".join(wrong)


def test_the_node_takes_only_the_wire_format_from_the_sdk() -> None:
    """The server side of api/ imports the SDK's codec, signing and answers, not its clients."""
    wrong = [
        f"{path.relative_to(ROOT)}:{line} imports {module}"
        for path in _sources("api")
        if "sdk" not in path.relative_to(ROOT / "api").parts and path.name != "sdk_example.py"
        for module, line in _imports_resolved(path)
        if (module == "api.sdk" or module.startswith("api.sdk."))
        and not any(module == w or module.startswith(w + ".") for w in WIRE_FORMAT)
    ]
    assert not wrong, "\n".join(wrong)


def test_only_the_raft_adapter_imports_pysyncobj() -> None:
    wrong = [
        f"{path.relative_to(ROOT)}:{line}"
        for package in OURS
        for path in _sources(package)
        for module, line in _imports(path)
        if module.split(".")[0] == "pysyncobj"
        and not (package == "cluster" and path.parent.name == "raft")
    ]
    assert not wrong, "pysyncobj imported outside cluster/raft/:\n" + "\n".join(wrong)


def test_the_raft_adapter_is_used_through_its_package_only() -> None:
    """cluster/raft/ has one public surface, its __init__: the rest of the project (tests
    excepted) imports `cluster.raft`, never its modules."""
    wrong = [
        f"{path.relative_to(ROOT)}:{line} imports {module}"
        for package in OURS
        for path in _sources(package)
        if path.parent.name != "raft"
        for module, line in _imports(path)
        if module.startswith("cluster.raft.")
    ]
    assert not wrong, "\n".join(wrong)


def test_statemachine_is_pure() -> None:
    """No clock, randomness, I/O or pickle in the replicated state machine."""
    banned = {
        "time",
        "random",
        "uuid",
        "os",
        "socket",
        "pickle",
        "datetime",
        "secrets",
        "threading",
    }
    wrong = [
        f"{path.relative_to(ROOT)}:{line} imports {module}"
        for path in _sources("statemachine")
        for module, line in _imports(path)
        if module.split(".")[0] in banned
    ]
    assert not wrong, "\n".join(wrong)


def test_a_node_loads_no_client_and_reads_no_entry_points_to_start() -> None:
    # What `python -m cluster node run` imports before it loads its state: the SDK's clients
    # (httpx, websockets) are not the wire format, and the entry points of the plugin
    # commands are read only for a command that is not the CLI's own (cluster/cli.py).
    import subprocess

    probe = (
        "import sys, importlib.metadata as md; calls = []; "
        "md.entry_points = lambda **kw: calls.append(kw) or []; "
        "import cluster.cli, cluster.node; "
        "from api.sdk import read_credentials; "
        "cluster.cli.main.get_command(None, 'node'); "
        "print(sorted(m for m in ('httpx', 'api.sdk.client', 'api.sdk.admin') "
        "if m in sys.modules), calls)"
    )
    out = subprocess.run(
        [sys.executable, "-P", "-c", probe], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "[] []", out.stdout + out.stderr
