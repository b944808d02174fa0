"""The plugin system: loading from the three places, registration, errors, and every hook."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from PIL import Image

from charfw.errors import PluginError
from charfw.plugins import PluginSystem

REPO = Path(__file__).resolve().parents[1]


def plugin_file(ws: Path, name: str, code: str) -> Path:
    folder = ws / "plugins"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.py"
    path.write_text(textwrap.dedent(code))
    return path


def add_stage(ws: Path, text: str, manifest: str = "krnk") -> None:
    path = ws / "characters" / f"{manifest}.yaml"
    path.write_text(path.read_text() + textwrap.indent(textwrap.dedent(text), "  "))


def cli(ws: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    from conftest import charfw_exe

    full_env = {**os.environ, "CHARFW_PLUGINS": "", **(env or {})}
    return subprocess.run([charfw_exe(), "-C", str(ws), *args], capture_output=True, text=True, env=full_env)


# --- loading ------------------------------------------------------------------------------


def test_builtins_register_the_default_of_each_image_stage() -> None:
    registry = PluginSystem(None).registry
    assert "folder" in registry.names("source")
    assert "flat" in registry.names("background")
    assert "square" in registry.names("preparer")
    assert "angle-rules" in registry.names("tagger")
    assert "kohya-toml" in registry.names("dataset_writer")
    reg = registry.find("tagger", "angle-rules")
    assert reg is not None and reg.plugin.name == "charfw.taggers.angle_rules" and reg.plugin.source == "built-in"


def test_plugins_command_lists_what_each_plugin_registers(run_cli) -> None:
    code, out, _ = run_cli("plugins")
    assert code == 0 and "charfw.taggers.angle_rules" in out and "tagger: angle-rules (v1)" in out
    code, out, _ = run_cli("plugins", "--json")
    rows = {r["name"]: r for r in json.loads(out)}
    square = rows["charfw.prepare.square"]
    assert square["hooks"] == ["register_image_preparers"]
    [entry] = square["registers"]["preparer"]
    assert entry["name"] == "square" and {o["name"] for o in entry["options"]} >= {"mode", "size", "pad_color"}


def test_the_repository_is_a_workspace_without_loading_builtins_twice() -> None:
    result = cli(REPO, "plugins")
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("charfw.taggers.angle_rules") == 1


def test_workspace_plugins_can_be_limited_and_traced(workspace: Path) -> None:
    plugin_file(workspace, "extra", """
        import charfw
        from charfw.components import Tagger
        class Extra(Tagger):
            name = "extra"
            needs_pixels = False
            def tag(self, ctx, options, items, images, tags_so_far):
                return [["extra"] for _ in items]
        @charfw.hookimpl
        def register_taggers(register):
            register(Extra())
    """)
    listed = cli(workspace, "plugins", env={"CHARFW_PLUGINS": "extra"}).stdout
    assert f"extra  file {workspace}/plugins/extra.py, file-" in listed
    assert "extra" not in cli(workspace, "plugins", env={"CHARFW_PLUGINS": "someone-else"}).stdout
    traced = cli(workspace, "plugins", env={"CHARFW_PLUGINS": "extra", "CHARFW_TRACE_PLUGINS": "1"})
    assert "[charfw plugins] extra: register_taggers" in traced.stderr


def test_entry_point_plugins(tmp_path: Path, workspace: Path) -> None:
    site = tmp_path / "site"
    (site / "charfw_hello.py").parent.mkdir(parents=True)
    (site / "charfw_hello.py").write_text(textwrap.dedent("""
        import charfw
        from charfw.components import Tagger
        class Hello(Tagger):
            name = "hello"
            needs_pixels = False
            def tag(self, ctx, options, items, images, tags_so_far):
                return [["hello"] for _ in items]
        @charfw.hookimpl
        def register_taggers(register):
            register(Hello())
    """))
    dist = site / "charfw_hello-1.2.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: charfw-hello\nVersion: 1.2\n")
    (dist / "entry_points.txt").write_text("[charfw]\nhello = charfw_hello\n")
    env = {"PYTHONPATH": str(site)}
    listed = cli(workspace, "plugins", env={**env, "CHARFW_PLUGINS": "hello"})
    assert "hello  entry point charfw_hello in charfw-hello 1.2, 1.2" in listed.stdout
    assert "tagger: hello" in listed.stdout
    assert "charfw-hello" not in cli(workspace, "plugins", env=env).stdout  # CHARFW_PLUGINS="": none
    del_env = {k: v for k, v in os.environ.items() if k != "CHARFW_PLUGINS"}
    everything = subprocess.run([sys.executable, "-m", "charfw", "-C", str(workspace), "plugins"],
                                capture_output=True, text=True, env={**del_env, **env})
    assert "charfw-hello" in everything.stdout  # unset: every entry point loads


def test_duplicate_names_are_rejected_with_both_sources(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CHARFW_PLUGINS", "a,b")
    for name in ("a", "b"):
        plugin_file(tmp_path, name, """
            import charfw
            from charfw.components import Tagger
            class T(Tagger):
                name = "dup"
                needs_pixels = False
                def tag(self, ctx, options, items, images, tags_so_far):
                    return [[] for _ in items]
            @charfw.hookimpl
            def register_taggers(register):
                register(T())
        """)
    with pytest.raises(PluginError) as info:
        PluginSystem(tmp_path / "plugins")
    text = str(info.value)
    assert "tagger 'dup' is registered twice: by a (file " in text and "plugins/a.py" in text
    assert "and by b (file " in text and "plugins/b.py" in text
    # clashing with a built-in is the same error
    (tmp_path / "plugins" / "b.py").unlink()
    (tmp_path / "plugins" / "a.py").write_text((tmp_path / "plugins" / "a.py").read_text().replace('"dup"', '"angle-rules"'))
    with pytest.raises(PluginError, match=r"tagger 'angle-rules' is registered twice: by charfw.taggers.angle_rules \(built-in\) and by a"):
        PluginSystem(tmp_path / "plugins")


COMMAND_PLUGIN = """
    import click
    import charfw
    @charfw.hookimpl
    def register_commands(cli):
        @cli.command("NAME")
        def hello():
            \"\"\"Say hello.\"\"\"
            click.echo("hello from PLUGIN")
"""


def test_a_command_name_registered_twice_is_one_line_naming_both(workspace: Path) -> None:
    for name in ("a", "b"):
        plugin_file(workspace, name, COMMAND_PLUGIN.replace("NAME", "hello").replace("PLUGIN", name))
    result = cli(workspace, "hello", env={"CHARFW_PLUGINS": "a,b"})
    assert result.returncode == 3 and "Traceback" not in result.stderr
    [line] = result.stderr.strip().splitlines()
    assert "command 'hello' is registered twice: by a (file " in line and "plugins/a.py" in line
    assert "and by b (file " in line and "plugins/b.py" in line
    # the same for a built-in plugin's command (no longer silently replaced) and for charfw's own
    plugin_file(workspace, "a", COMMAND_PLUGIN.replace("NAME", "wd14").replace("PLUGIN", "a"))
    result = cli(workspace, "--help", env={"CHARFW_PLUGINS": "a"})
    assert result.returncode == 3 and len(result.stderr.strip().splitlines()) == 1
    assert "command 'wd14' is registered twice: by charfw.taggers.wd14 (built-in) and by a (file " in result.stderr
    plugin_file(workspace, "a", COMMAND_PLUGIN.replace("NAME", "build").replace("PLUGIN", "a"))
    result = cli(workspace, "plugins", env={"CHARFW_PLUGINS": "a"})
    assert result.returncode == 3 and "command 'build' is registered twice: by charfw's own commands and by a" in result.stderr
    # one plugin alone is fine, and `charfw plugins` says which plugin adds which command
    plugin_file(workspace, "a", COMMAND_PLUGIN.replace("NAME", "hello").replace("PLUGIN", "a"))
    assert cli(workspace, "hello", env={"CHARFW_PLUGINS": "a"}).stdout == "hello from a\n"
    listed = cli(workspace, "plugins", env={"CHARFW_PLUGINS": "a"}).stdout
    assert re.search(r"^a  file .*\n  hooks: register_commands\n  commands: hello$", listed, re.M)
    assert re.search(r"^charfw.taggers.wd14  .*\n  hooks: .*\n  commands: wd14$", listed, re.M)
    rows = {r["name"]: r for r in json.loads(cli(workspace, "plugins", "--json", env={"CHARFW_PLUGINS": "a"}).stdout)}
    assert rows["a"]["commands"] == ["hello"] and rows["charfw.commands.caption_tools"]["commands"] == ["tags"]


def test_one_builtin_command_loads_only_its_plugin_and_the_table_is_what_loading_all_adds(
        workspace: Path) -> None:
    """`charfw lora info` imports the lora commands module, not every plugin (their imports
    were most of its start-up); the table it looks in is what loading every plugin adds,
    and a workspace plugin that takes the same name still makes it an error naming both."""
    import click

    from charfw.plugins import BUILTIN_COMMANDS

    group = click.Group()
    system = PluginSystem(None)
    system.add_commands(group)
    added = {name: info.name.removeprefix("charfw.") for info in system.infos.values()
             if info.source == "built-in" for name in info.commands}
    assert added == BUILTIN_COMMANDS
    code = ("import sys; from charfw.cli import main\n"
            "try:\n    main(['lora', 'presets'])\nexcept SystemExit as exc:\n    assert not exc.code\n"
            "print(sorted(m for m in sys.modules if m.startswith('charfw.default_plugins.')))")
    result = subprocess.run([sys.executable, "-c", code], cwd=workspace, capture_output=True, text=True,
                            env={**os.environ, "CHARFW_PLUGINS": ""})
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "['charfw.default_plugins.lora', 'charfw.default_plugins.lora.commands']"
    plugin_file(workspace, "a", COMMAND_PLUGIN.replace("NAME", "lora").replace("PLUGIN", "a"))
    result = cli(workspace, "lora", "presets", env={"CHARFW_PLUGINS": "a"})
    assert result.returncode == 3 and "command 'lora' is registered twice: by charfw.lora.commands (built-in)" in result.stderr


def test_a_misspelled_hook_is_caught(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CHARFW_PLUGINS", "typo")
    plugin_file(tmp_path, "typo", """
        import charfw
        @charfw.hookimpl
        def register_tagers(register):
            pass
    """)
    with pytest.raises(PluginError, match=r"plugin typo \(file .*typo.py\): .*register_tagers"):
        PluginSystem(tmp_path / "plugins")


def test_broken_plugin_files_give_one_line_errors(workspace: Path) -> None:
    plugin_file(workspace, "bad", "import charfw\n\ndef oops(:\n")
    result = cli(workspace, "plugins", env={"CHARFW_PLUGINS": "bad"})
    assert result.returncode == 3 and "Traceback" not in result.stderr
    assert re.search(r"error: .*plugins/bad.py:3 syntax error: invalid syntax", result.stderr)
    plugin_file(workspace, "bad", "import charfw\nx = 1\nraise RuntimeError('boom')\n")
    result = cli(workspace, "plugins", env={"CHARFW_PLUGINS": "bad"})
    assert result.returncode == 3
    assert re.search(r"plugins/bad.py:3 plugin failed to load: RuntimeError: boom; fix it, or move it out", result.stderr)


def test_registering_something_that_is_not_a_component(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CHARFW_PLUGINS", "wrong")
    plugin_file(tmp_path, "wrong", """
        import charfw
        @charfw.hookimpl
        def register_taggers(register):
            register(object())
    """)
    with pytest.raises(PluginError, match=r"expected an instance of charfw\.components\.Tagger"):
        PluginSystem(tmp_path / "plugins")


def test_hookimpl_is_reexported() -> None:
    import pluggy

    import charfw

    assert isinstance(charfw.hookimpl, pluggy.HookimplMarker) and charfw.hookimpl.project_name == "charfw"


# --- one test per hook --------------------------------------------------------------------


def test_hook_register_taggers(workspace: Path, run_cli) -> None:
    """The README's smallest plugin, exactly as printed there, chained after the angle rules."""
    readme = (REPO / "README.md").read_text()
    code = re.search(r"```python\n(# plugins/shout.py.*?)```", readme, re.S)
    assert code, "README lost its smallest-plugin example"
    (workspace / "plugins").mkdir()
    (workspace / "plugins" / "shout.py").write_text(code.group(1))
    os.environ["CHARFW_PLUGINS"] = "shout"
    path = workspace / "characters/krnk.yaml"
    path.write_text(path.read_text().replace("tag: angle-rules", "tag: [angle-rules, shout]"))
    status, out, err = run_cli("build", "krnk", "--until", "tag", cwd=workspace)
    assert status == 0, out + err
    caption = (workspace / "build/krnk/face/tag/captions/f00.txt").read_text()
    assert caption.startswith("krnk, white background") and caption.endswith("blush, shouting")
    folder = workspace / "4_x" / "x girl_f512"
    folder.mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(folder / "f01.png")
    status, out, _ = run_cli("tag", "--tagger", "angle-rules", "--tagger", "shout", folder, cwd=workspace)
    assert status == 0 and (folder / "f01.txt").read_text().endswith("blush, shouting")


TEST_PLUGIN = '''
import json
from pathlib import Path

from PIL import Image

import charfw
from charfw.build import atomic
from charfw.components import (BackgroundRemover, BlockMerger, Compressor, DatasetWriter, Drafter, ImageFilter,
                               ImagePreparer, Options, Sampler, Source, Trainer)
from charfw.build.items import ImageItem
from charfw.stage_context import StageOutput

CALLS = Path(__file__).parent.parent / "calls.jsonl"


def note(**data):
    with open(CALLS, "a") as fh:
        fh.write(json.dumps(data) + "\\n")


class Sketch(Drafter):
    """One candidate per angle code, noting the LoRA it was given (a body: its face's)."""
    name = "test-drafter"

    def run(self, ctx, options):
        loras = [json.loads(Path(ctx.path(o.files["lora"])).read_text()) for o in ctx.inputs.values()]
        out = ctx.stage_dir / "drafts.json"
        atomic.write_text(out, json.dumps({"codes": list(ctx.part.angles)[:3], "loras": loras}))
        return StageOutput(files={"drafts": ctx.record_path(out)}, summary=[f"{len(loras)} lora(s)"])


class Squares(Source):
    """Draws its own images: one per code in the options."""
    name = "test-squares"

    class Options(Options):
        codes: list[str] = ["f00", "f01", "f14"]

    def collect(self, ctx, options):
        out = []
        for code in options.codes:
            path = ctx.stage_dir / f"{code}.png"
            ctx.stage_dir.mkdir(parents=True, exist_ok=True)
            im = Image.new("RGBA", (64, 64), (0, 0, 0, 0))
            im.paste((200, 0, 0, 255), (16, 16, 48, 48))
            im.save(path)
            out.append(ImageItem(id=code, path=ctx.record_path(path), sha256=ctx.sha256(path),
                                 source=ctx.record_path(path), code=code, width=64, height=64))
        return out


class NoBehind(ImageFilter):
    name = "test-no-behind"

    def select(self, ctx, options, items):
        return [i for i in items if i.angle is None or i.angle.horizontal != 4]


class Halve(BackgroundRemover):
    """Makes everything transparent except the red square's inner half."""
    name = "test-halve"

    def cutout(self, ctx, options, image, item):
        out = Image.new("RGBA", image.size, (0, 0, 0, 0))
        out.paste((255, 0, 0, 255), (24, 24, 40, 40))
        return out


class Gray(ImagePreparer):
    name = "test-gray"

    def prepare(self, ctx, options, image, item):
        return image.convert("L").convert("RGB")


class JsonWriter(DatasetWriter):
    name = "test-json"
    filename = "dataset.json"

    def render(self, ctx, options, spec):
        return json.dumps([{"dir": s.image_dir.as_posix(), "n": len(s.sizes)} for s in spec.subsets])


class CountTrainer(Trainer):
    """Writes a small file that records what it was given (a test double for a trainer)."""
    name = "test-trainer"

    def run(self, ctx, options):
        config = ctx.input_file("config")
        out = ctx.stage_dir / "lora.json"
        atomic.write_text(out, json.dumps({"config": config.name, "part": ctx.part.label}))
        return StageOutput(files={"lora": ctx.record_path(out)}, summary=[f"lora {ctx.record_path(out)}"])


class Append(BlockMerger):
    name = "test-merge"

    def run(self, ctx, options):
        data = json.loads(ctx.input_file("lora").read_text())
        out = ctx.stage_dir / "merged.json"
        atomic.write_text(out, json.dumps({**data, "merged": ctx.part.kind}))
        return StageOutput(files={"lora": ctx.record_path(out)})


class Shrink(Compressor):
    name = "test-compress"

    def run(self, ctx, options):
        data = json.loads(ctx.input_file("lora").read_text())
        out = ctx.stage_dir / "small.json"
        atomic.write_text(out, json.dumps({**data, "compressed": True}))
        return StageOutput(files={"lora": ctx.record_path(out)})


class Look(Sampler):
    name = "test-sampler"

    def run(self, ctx, options):
        out = ctx.stage_dir / "sample.png"
        ctx.stage_dir.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8)).save(out)
        return StageOutput(files={"sample": ctx.record_path(out)}, summary=["1 sample"])


@charfw.hookimpl
def register_drafters(register):
    register(Sketch())

@charfw.hookimpl
def register_sources(register):
    register(Squares())

@charfw.hookimpl
def register_image_filters(register):
    register(NoBehind())

@charfw.hookimpl
def register_background_removers(register):
    register(Halve())

@charfw.hookimpl
def register_image_preparers(register):
    register(Gray())

@charfw.hookimpl
def register_dataset_writers(register):
    register(JsonWriter())

@charfw.hookimpl
def register_trainers(register):
    register(CountTrainer())

@charfw.hookimpl
def register_block_mergers(register):
    register(Append())

@charfw.hookimpl
def register_compressors(register):
    register(Shrink())

@charfw.hookimpl
def register_samplers(register):
    register(Look())

@charfw.hookimpl
def register_commands(cli):
    import click

    @cli.command()
    @click.argument("who")
    def hello(who):
        """Say hello (a command added by a plugin)."""
        click.echo(f"hello {who}")

@charfw.hookimpl
def build_started(plan):
    note(hook="build_started", targets=plan.targets, stages=len(plan.stages))

@charfw.hookimpl
def stage_finished(report):
    note(hook="stage_finished", key=report.stage.key, status=report.status)

@charfw.hookimpl
def build_finished(summary):
    note(hook="build_finished", ran=summary.count("ran"), stopped=summary.stopped)
'''

TEST_STAGES = """\
draft: test-drafter
ingest: {plugin: test-squares}
filter: test-no-behind
background: {plugin: test-halve, colors: [white]}
prepare: test-gray
dataset: test-json
train: test-trainer
merge: test-merge
compress: test-compress
sample: test-sampler
"""


@pytest.fixture
def plugged(workspace: Path) -> Path:
    plugin_file(workspace, "everything", TEST_PLUGIN)
    path = workspace / "characters/krnk.yaml"
    text = path.read_text().replace("stages:\n", "stages:\n" + textwrap.indent(TEST_STAGES, "  "), 1)
    text = "\n".join(line for line in text.splitlines() if not line.startswith(
        ("  background: {plugin: flat", "  prepare: {plugin: square", "  dataset: {plugin: kohya", "  sample: {plugin: angle-grid")))
    path.write_text(text + "\n")
    os.environ["CHARFW_PLUGINS"] = "everything"
    return workspace


def calls(ws: Path) -> list[dict]:
    return [json.loads(line) for line in (ws / "calls.jsonl").read_text().splitlines()]


def _build(ws: Path, run_cli) -> str:
    code, out, err = run_cli("build", "krnk", cwd=ws)
    assert code == 0, out + err
    return out


def test_hook_register_drafters(plugged: Path, run_cli) -> None:
    out = _build(plugged, run_cli)
    face = json.loads((plugged / "build/krnk/face/draft/drafts.json").read_text())
    assert face == {"codes": ["f00", "f01", "f02"], "loras": []}
    # a body's drafts are made with its character's finished face LoRA
    body = json.loads((plugged / "build/krnk/krnksf/draft/drafts.json").read_text())
    assert body["loras"] == [{"config": "dataset.json", "part": "krnk/face", "merged": "face", "compressed": True}]
    assert "1 lora(s)" in out
    # nothing reads the draft stage: the body's ingest does not depend on it
    record = json.loads((plugged / "build/krnk/krnksf/ingest/record.json").read_text())
    assert record["key"]["inputs"] == {}


def test_hook_register_sources(plugged: Path, run_cli) -> None:
    _build(plugged, run_cli)
    assert (plugged / "build/krnk/face/ingest/f00.png").is_file()
    record = json.loads((plugged / "build/krnk/face/ingest/record.json").read_text())
    assert [i["id"] for i in record["output"]["items"]] == ["f00", "f01", "f14"]


def test_hook_register_image_filters(plugged: Path, run_cli) -> None:
    out = _build(plugged, run_cli)
    assert "kept 2 of 3 images" in out


def test_hook_register_background_removers(plugged: Path, run_cli) -> None:
    _build(plugged, run_cli)
    [path] = (plugged / "build/krnk/face/background").glob("f00.*.png")
    with Image.open(path) as im:
        assert im.getpixel((0, 0)) == (255, 255, 255) and im.getpixel((30, 30)) == (255, 0, 0)


def test_hook_register_image_preparers(plugged: Path, run_cli) -> None:
    _build(plugged, run_cli)
    [path] = (plugged / "build/krnk/face/prepare").glob("f00.*.png")
    with Image.open(path) as im:
        r, g, b = im.getpixel((30, 30))
        assert r == g == b  # grey


def test_hook_register_dataset_writers(plugged: Path, run_cli) -> None:
    _build(plugged, run_cli)
    data = json.loads((plugged / "build/krnk/krnksf/dataset/dataset.json").read_text())
    assert [d["n"] for d in data] == [2, 2]  # the face's images and the body's


def test_hook_register_trainers(plugged: Path, run_cli) -> None:
    _build(plugged, run_cli)
    trained = json.loads((plugged / "build/krnk/krnksf/train/lora.json").read_text())
    assert trained == {"config": "dataset.json", "part": "krnk/krnksf"}


def test_hook_register_block_mergers(plugged: Path, run_cli) -> None:
    _build(plugged, run_cli)
    assert json.loads((plugged / "build/krnk/face/merge/merged.json").read_text())["merged"] == "face"


def test_hook_register_compressors(plugged: Path, run_cli) -> None:
    out = _build(plugged, run_cli)
    small = json.loads((plugged / "build/krnk/krnksf/compress/small.json").read_text())
    assert small == {"config": "dataset.json", "part": "krnk/krnksf", "merged": "body", "compressed": True}
    assert "Nothing to do" in _build(plugged, run_cli) and "ran" in out


def test_hook_register_samplers(plugged: Path, run_cli) -> None:
    out = _build(plugged, run_cli)
    assert (plugged / "build/krnk/face/sample/sample.png").is_file() and "1 sample" in out


def test_hook_register_commands(plugged: Path, run_cli, monkeypatch: pytest.MonkeyPatch) -> None:
    result = cli(plugged, "hello", "world", env={"CHARFW_PLUGINS": "everything"})
    assert result.returncode == 0 and result.stdout == "hello world\n"
    monkeypatch.setenv("CHARFW_PLUGINS", "everything")  # the same in-process, where the recorder sees it
    assert run_cli("hello", "world", cwd=plugged)[:2] == (0, "hello world\n")
    assert "Say hello" in cli(plugged, "--help", env={"CHARFW_PLUGINS": "everything"}).stdout


def test_hook_build_started(plugged: Path, run_cli) -> None:
    _build(plugged, run_cli)
    first = calls(plugged)[0]
    assert first == {"hook": "build_started", "targets": ["krnk"], "stages": 24}  # 12 stages x face, body


def test_hook_stage_finished(plugged: Path, run_cli) -> None:
    _build(plugged, run_cli)
    finished = [c for c in calls(plugged) if c["hook"] == "stage_finished"]
    assert [c["key"] for c in finished][:3] == ["krnk/face:draft", "krnk/face:ingest", "krnk/face:filter"]
    assert len(finished) == 24 and {c["status"] for c in finished} == {"ran"}
    _build(plugged, run_cli)
    again = [c for c in calls(plugged) if c["hook"] == "stage_finished"][24:]
    assert {c["status"] for c in again} == {"up to date"}


def test_hook_build_finished(plugged: Path, run_cli) -> None:
    _build(plugged, run_cli)
    assert calls(plugged)[-1] == {"hook": "build_finished", "ran": 24, "stopped": []}
