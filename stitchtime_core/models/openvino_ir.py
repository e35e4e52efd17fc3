"""OpenVINO IR files (an ``.xml`` graph and a ``.bin`` of raw constants) read as data.

The XML goes through ``defusedxml`` with document type declarations refused, so no entity is ever
expanded; each ``Const`` layer's tensor is read from the ``.bin`` by its declared offset, size, element
type and shape, every one checked against the file. Nothing in either file is executed: the graph is
only walked to find which constant feeds which operation.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from defusedxml import DefusedXmlException
from defusedxml.ElementTree import ParseError, parse

from stitchtime_core.errors import InputError

_ELEMENT_TYPES = {"f32": np.dtype("<f4"), "f16": np.dtype("<f2"), "i64": np.dtype("<i8"), "i32": np.dtype("<i4")}


@dataclass
class IRLayer:
    """One layer of the graph: its id, type, name, ``data`` attributes and output port names."""

    id: int
    type: str
    name: str
    data: dict[str, str]
    port_names: str = ""
    inputs: list[int] = field(default_factory=list)
    """The layers feeding this one, in input-port order."""
    consumers: list[int] = field(default_factory=list)
    """The layers this one feeds."""


class IRGraph:
    """An IR model's layers and constants. Build it with :func:`read_ir`."""

    def __init__(self, xml_path: Path, bin_path: Path, layers: dict[int, IRLayer], blob: bytes):
        self.xml_path, self.bin_path, self.layers, self._blob = xml_path, bin_path, layers, blob

    def of_type(self, kind: str) -> list[IRLayer]:
        """Every layer of one type, in id order."""
        return [layer for layer in self.layers.values() if layer.type == kind]

    def constant(self, layer: IRLayer | int) -> np.ndarray:
        """A ``Const`` layer's tensor (a copy), checked against its declared type, shape and extent.

        Raises:
            InputError: the layer is no constant, or its declaration does not fit the ``.bin`` file.
        """
        layer = self.layers[layer] if isinstance(layer, int) else layer
        if layer.type != "Const":
            raise InputError(self.xml_path, f"layer {layer.id} ({layer.name}) is a {layer.type}, not a constant")
        data = layer.data
        dtype = _ELEMENT_TYPES.get(data.get("element_type", ""))
        try:
            shape = tuple(int(d) for d in data.get("shape", "").replace(" ", "").split(",") if d != "")
            offset, size = int(data["offset"]), int(data["size"])
        except (KeyError, ValueError):
            raise InputError(self.xml_path, f"constant {layer.name!r} has no valid shape, offset or size") from None
        if dtype is None:
            raise InputError(self.xml_path, f"constant {layer.name!r} has element type "
                                            f"{data.get('element_type')!r}, not one of {', '.join(_ELEMENT_TYPES)}")
        if min(shape, default=0) < 0 or offset < 0 or size != math.prod(shape) * dtype.itemsize:
            raise InputError(self.xml_path, f"constant {layer.name!r} declares {size} bytes at {offset} for shape "
                                            f"{list(shape)} of {data['element_type']}: they do not agree")
        if offset + size > len(self._blob):
            raise InputError(self.bin_path, f"is {len(self._blob)} bytes, but constant {layer.name!r} lies at "
                                            f"{offset}..{offset + size}: the file is cut short or not this "
                                            f"graph's weights")
        return np.frombuffer(self._blob, dtype, count=math.prod(shape), offset=offset).reshape(shape).copy()

    def named_constants(self) -> dict[str, IRLayer]:
        """The constants whose output port carries a name (the exporter keeps PyTorch's parameter names)."""
        return {layer.port_names: layer for layer in self.of_type("Const") if layer.port_names}

    def producer(self, layer: IRLayer, port: int) -> IRLayer:
        """The layer feeding input ``port`` of ``layer``."""
        if port >= len(layer.inputs):
            raise InputError(self.xml_path, f"layer {layer.id} ({layer.name}) has no input {port}")
        return self.layers[layer.inputs[port]]


def read_ir(xml_path: str | os.PathLike, bin_path: str | os.PathLike | None = None) -> IRGraph:
    """Parse an IR ``.xml`` graph (v10 or v11) and load its ``.bin`` (default: beside it, same stem).

    Raises:
        InputError: a file is missing, not an IR graph, declares entities or a DTD, or does not fit.
    """
    xml_path = Path(xml_path)
    bin_path = Path(bin_path) if bin_path is not None else xml_path.with_suffix(".bin")
    for path in (xml_path, bin_path):
        if not path.is_file():
            raise InputError(path, "is missing")
    try:
        root = parse(xml_path, forbid_dtd=True, forbid_entities=True, forbid_external=True).getroot()
    except (ParseError, DefusedXmlException) as exc:
        raise InputError(xml_path, f"is not a readable IR graph ({exc})") from None
    if root.tag != "net" or root.get("version") not in ("10", "11"):
        raise InputError(xml_path, f"is not an OpenVINO IR v10/v11 graph (root <{root.tag}> "
                                   f"version {root.get('version')!r})")
    layers: dict[int, IRLayer] = {}
    layer_nodes, edge_nodes = root.find("layers"), root.find("edges")
    if layer_nodes is None or edge_nodes is None:
        raise InputError(xml_path, "is not an OpenVINO IR graph (no <layers> or <edges>)")
    try:
        for node in layer_nodes:
            data = node.find("data")
            port = node.find("output/port")
            layer = IRLayer(int(node.get("id")), node.get("type", ""), node.get("name", ""),
                            dict(data.attrib) if data is not None else {},
                            port.get("names", "") if port is not None else "")
            layers[layer.id] = layer
        inputs: dict[int, list[tuple[int, int]]] = {}
        for edge in edge_nodes:
            source, target = int(edge.get("from-layer")), int(edge.get("to-layer"))
            if source not in layers or target not in layers:
                raise ValueError(f"an edge joins unknown layers {source} and {target}")
            inputs.setdefault(target, []).append((int(edge.get("to-port")), source))
            layers[source].consumers.append(target)
    except (TypeError, ValueError) as exc:
        raise InputError(xml_path, f"is not a well-formed IR graph ({exc})") from None
    for target, sources in inputs.items():
        layers[target].inputs = [source for _, source in sorted(sources)]
    if not layers:
        raise InputError(xml_path, "holds no layers")
    return IRGraph(xml_path, bin_path, layers, bin_path.read_bytes())
