"""Fake of modules/scripts.py: the Script base class (hooks in real call order), AlwaysVisible,
scripts_data and basedir()."""

from __future__ import annotations

import re
from collections import namedtuple

from modules import paths

AlwaysVisible = object()
ScriptClassData = namedtuple("ScriptClassData", ["script_class", "path", "basedir", "module"])
scripts_data: list = []
current_basedir = paths.script_path


def basedir():
    return current_basedir


class Script:
    name = None
    section = None
    filename = None
    args_from = None
    args_to = None
    alwayson = False
    is_txt2img = False
    is_img2img = False
    tabname = None
    group = None
    create_group = True
    infotext_fields = None
    paste_field_names = None
    api_info = None
    on_before_component_elem_id = None
    on_after_component_elem_id = None
    setup_for_ui_only = False
    controls = None

    def title(self):
        raise NotImplementedError()

    def ui(self, is_img2img):
        pass

    def show(self, is_img2img):
        return True

    def run(self, p, *args):
        pass

    def setup(self, p, *args):
        pass

    def before_process(self, p, *args):
        pass

    def process(self, p, *args):
        pass

    def before_process_batch(self, p, *args, **kwargs):
        pass

    def process_batch(self, p, *args, **kwargs):
        pass

    def postprocess_batch(self, p, *args, **kwargs):
        pass

    def postprocess(self, p, processed, *args):
        pass

    def before_component(self, component, **kwargs):
        pass

    def after_component(self, component, **kwargs):
        pass

    def describe(self):
        return ""

    def elem_id(self, item_id):
        need_tabname = self.show(True) == self.show(False)
        tabkind = "img2img" if self.is_img2img else "txt2img"
        tabname = f"{tabkind}_" if need_tabname else ""
        title = re.sub(r"[^a-z_0-9]", "", re.sub(r"\s", "_", self.title().lower()))
        return f"script_{tabname}{title}_{item_id}"

    def before_hr(self, p, *args):
        pass


def _report(message):
    from modules import errors

    errors.report(message, exc_info=True)


class ScriptRunner:
    """The subset of modules/scripts.py ScriptRunner a generation uses: each hook gets
    ``p.script_args[args_from:args_to]`` and exceptions are reported, never raised."""

    def __init__(self):
        self.scripts = []
        self.alwayson_scripts = []
        self.inputs = [None]

    def add(self, script, n_args):
        script.alwayson = True
        script.args_from = len(self.inputs)
        self.inputs += [None] * n_args
        script.args_to = len(self.inputs)
        self.scripts.append(script)
        self.alwayson_scripts.append(script)

    def _each(self, name, p, *extra, **kwargs):
        for script in self.alwayson_scripts:
            try:
                args = p.script_args[script.args_from : script.args_to]
                getattr(script, name)(p, *extra, *args, **kwargs)
            except Exception:
                _report(f"Error running {name}: {script.filename}")

    def before_process(self, p):
        self._each("before_process", p)

    def process(self, p):
        self._each("process", p)

    def before_process_batch(self, p, **kwargs):
        self._each("before_process_batch", p, **kwargs)

    def process_batch(self, p, **kwargs):
        self._each("process_batch", p, **kwargs)

    def postprocess(self, p, processed):
        self._each("postprocess", p, processed)
