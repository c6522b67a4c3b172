"""The same nodes in ComfyUI's V3 schema (`comfy_api.latest`), built from the classic definitions in `.nodes`.

One definition of every input serves both APIs; this module is imported only where `comfy_api.latest` exists.
"""

from __future__ import annotations

from comfy_api.latest import ComfyExtension, io

from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

_WIDGET_OPTIONS = {
    "INT": ("default", "min", "max", "step", "control_after_generate", "tooltip"),
    "FLOAT": ("default", "min", "max", "step", "round", "tooltip"),
    "STRING": ("default", "multiline", "placeholder", "tooltip"),
    "COMBO": ("default", "tooltip"),
}


def v3_input(name: str, spec: tuple, optional: bool) -> io.Input:
    kind, options = spec[0], spec[1] if len(spec) > 1 else {}
    if isinstance(kind, list):
        kept = {key: options[key] for key in _WIDGET_OPTIONS["COMBO"] if key in options}
        return io.Combo.Input(name, options=kind, optional=optional, **kept)
    widget = {"INT": io.Int, "FLOAT": io.Float, "STRING": io.String}.get(kind)
    if widget is None:
        return io.Custom(kind).Input(name, optional=optional, tooltip=options.get("tooltip"))
    kept = {key: options[key] for key in _WIDGET_OPTIONS[kind] if key in options}
    return widget.Input(name, optional=optional, **kept)


def v3_node(node_id: str, classic: type) -> type[io.ComfyNode]:
    """A V3 node whose schema and execution are the classic node's."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        spec = classic.INPUT_TYPES()
        inputs = [v3_input(name, s, False) for name, s in spec["required"].items()]
        inputs += [v3_input(name, s, True) for name, s in spec.get("optional", {}).items()]
        names = getattr(classic, "RETURN_NAMES", classic.RETURN_TYPES)
        lists = getattr(classic, "OUTPUT_IS_LIST", (False,) * len(names))
        outputs = [
            io.Custom(kind).Output(name, is_output_list=is_list)
            for kind, name, is_list in zip(classic.RETURN_TYPES, names, lists, strict=True)
        ]
        return io.Schema(
            node_id=node_id, display_name=NODE_DISPLAY_NAME_MAPPINGS[node_id], category=classic.CATEGORY,
            description=classic.DESCRIPTION, inputs=inputs, outputs=outputs,
            is_output_node=getattr(classic, "OUTPUT_NODE", False),
        )  # fmt: skip

    @classmethod
    def execute(cls, **inputs) -> io.NodeOutput:
        out = getattr(classic(), classic.FUNCTION)(**inputs)
        if isinstance(out, dict):
            return io.NodeOutput(*out["result"], ui=out.get("ui"))
        return io.NodeOutput(*out)

    return type(classic.__name__, (io.ComfyNode,), {"define_schema": define_schema, "execute": execute})


class DTSExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return [v3_node(node_id, classic) for node_id, classic in NODE_CLASS_MAPPINGS.items()]


async def comfy_entrypoint() -> DTSExtension:
    return DTSExtension()
