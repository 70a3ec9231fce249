"""The READMEs' Python snippets and commands still work: a move or rename cannot silently break what users
copy. Every ```python block must compile and import only names that exist; the server README's two blocks
(cut a "cats" domain out of ImageNet, then drive it through the client) run for real against a server; every
``python -m MODULE`` names a module that exists and every ``multidomain ...`` command line parses."""

from __future__ import annotations

import ast
import importlib
import importlib.util
import io
import re
import shlex
from pathlib import Path

import pytest

from multidomain.cli import build_parser

ROOT = Path(__file__).resolve().parent.parent
READMES = ["README.md", "server/README.md", "training/README.md", "client/README.md"]
_FENCE = re.compile(r"^```(\w*)\n(.*?)^```$", re.S | re.M)


def blocks(language: str) -> list[tuple[str, str]]:
    """(readme:line, code) of every fenced block of ``language`` in the READMEs."""
    out = []
    for readme in READMES:
        text = (ROOT / readme).read_text()
        for match in _FENCE.finditer(text):
            if match.group(1) == language:
                out.append((f"{readme}:{text[: match.start()].count(chr(10)) + 1}", match.group(2)))
    return out


def inline_code() -> list[tuple[str, str]]:
    """(readme, span) of every `inline code` span outside fenced blocks (prose names commands too)."""
    out = []
    for readme in READMES:
        text = _FENCE.sub("", (ROOT / readme).read_text())
        out += [(readme, span) for span in re.findall(r"`([^`\n]+)`", text)]
    return out


PYTHON_BLOCKS = blocks("python")
SHELL_LINES = [
    (where, line)
    for where, code in blocks("sh") + blocks("bash") + blocks("")
    for line in code.replace("\\\n", " ").splitlines()
]
INLINE = inline_code()


@pytest.mark.parametrize(("where", "code"), PYTHON_BLOCKS, ids=[w for w, _ in PYTHON_BLOCKS])
def test_python_snippet_imports_exist(where: str, code: str) -> None:
    tree = ast.parse(code, filename=where)  # a SyntaxError fails here
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                importlib.import_module(alias.name)
        elif isinstance(node, ast.ImportFrom) and node.module:
            module = importlib.import_module(node.module)
            missing = [a.name for a in node.names if not hasattr(module, a.name)]
            assert not missing, f"{where}: {node.module} has no {missing}"


def test_there_are_snippets_to_check() -> None:
    assert len(PYTHON_BLOCKS) >= 3 and any("multidomain" in line for _, line in SHELL_LINES)


def _commands(prefix: str, lines: list[tuple[str, str]] = SHELL_LINES) -> list[tuple[str, list[str]]]:
    found = []
    for where, line in lines:
        for part in re.split(r"&&|\|", line.split(" #")[0]):
            try:
                words = shlex.split(part, comments=True)
            except ValueError:  # prose in backticks, not a command line
                continue
            for i, word in enumerate(words):
                named = word == prefix or word.endswith("/" + prefix)
                if named and not (i and words[i - 1].startswith("-")):  # not `docker run --name multidomain`
                    found.append((where, words[i + 1 :]))
    return found


def test_python_m_modules_exist() -> None:
    calls = [c for lines in (SHELL_LINES, INLINE) for p in ("python", "python3") for c in _commands(p, lines)]
    modules = [(w, args[1]) for w, args in calls if len(args) > 1 and args[0] == "-m"]
    assert any(m.startswith("bench.") for _, m in modules)
    missing = [(w, m) for w, m in modules if importlib.util.find_spec(m) is None]
    assert not missing


def test_multidomain_commands_parse() -> None:
    commands = _commands("multidomain")
    assert commands
    parser = build_parser()
    for where, args in commands:
        try:
            parser.parse_args([*args])
        except SystemExit as exc:  # argparse's verdict: 0 for --help, 2 for a bad command line
            assert exc.code == 0, f"{where}: `multidomain {shlex.join(args)}` does not parse"


def test_multidomain_commands_named_in_prose_exist() -> None:
    """`multidomain train allocation` in a sentence need not carry every argument, but must name a command."""
    commands = _commands("multidomain", INLINE)
    assert any(args[:1] == ["train"] for _, args in commands)
    parser = build_parser()
    for where, args in commands:
        path = [a for a in args if not a.startswith("-")][:2]
        if not path or path[-1] in ("...", "..."):
            continue
        with pytest.raises(SystemExit) as done:
            parser.parse_args([*path, "--help"])
        assert done.value.code == 0, f"{where}: `multidomain {' '.join(path)}` is not a command"


# -- the server README, run ---------------------------------------------------------------------------


def _server_readme_blocks() -> tuple[str, str]:
    """The block that writes cats.tar and the one that drives the project's client (others: other clients)."""
    server = [code for where, code in PYTHON_BLOCKS if where.startswith("server/README.md")]
    [make_cats] = [code for code in server if "write_bundle" in code]
    [use_client] = [code for code in server if "MultidomainClient" in code]
    return make_cats, use_client


@pytest.mark.slow
def test_server_readme_cats_domain_and_client_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from model_artifacts import mobilenet_weights_installed

    if not mobilenet_weights_installed():
        pytest.skip("offline MobileNetV2 weights not installed")
    from multidomain_client import MultidomainClient
    from PIL import Image
    from skimage import data

    from adapters_store import LocalStore
    from multidomain.bootstrap import bootstrap_store
    from server.app import create_app
    from server.serving import ServerThread
    from server.settings import Settings

    make_cats, use_client = _server_readme_blocks()
    monkeypatch.chdir(tmp_path)
    exec(compile(make_cats, "server/README.md (make_cats.py)", "exec"), {})
    assert (tmp_path / "cats.tar").stat().st_size > 0
    Image.fromarray(data.chelsea()).save(tmp_path / "chelsea.jpg")

    store_dir = tmp_path / "store"
    bootstrap_store(store_dir)  # what `make serve` does on an empty store
    settings = Settings(store_dir=store_dir, admin_token="secret", bank_slots=2, revision_poll_s=0.0)  # type: ignore[call-arg,arg-type]
    printed = io.StringIO()
    with ServerThread(create_app(settings)) as server:
        with MultidomainClient(server.url, token="secret") as client:  # the README's curl upload: version 1
            assert client.upload_bundle("cats", (tmp_path / "cats.tar").read_bytes())["version"] == 1
        code = use_client.replace("http://127.0.0.1:8000", server.url)
        exec(
            compile(code, "server/README.md (client)", "exec"), {"print": lambda *a: print(*a, file=printed)}
        )
    info = LocalStore(store_dir).describe("cats")
    assert info.versions == (2,) and info.active == 2
    top = printed.getvalue()
    assert "Egyptian cat" in top
