"""OpenVINO IR files read as data: constants by their declared offset, type and shape; no entity is ever
expanded; a file cut short or made for another network gives one InputError naming it."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from stitchtime_core.errors import InputError
from stitchtime_core.models.mobile import load_mobile_generator
from stitchtime_core.models.openvino_ir import read_ir

WEIGHT = np.arange(6, dtype=np.float32).reshape(2, 3)
BIAS = np.array([7, -8], dtype=np.int64)


def _const(layer_id: int, name: str, array: np.ndarray, offset: int, element_type: str) -> str:
    shape = ", ".join(str(d) for d in array.shape)
    return (f'<layer id="{layer_id}" name="{name}" type="Const" version="opset1">'
            f'<data element_type="{element_type}" shape="{shape}" offset="{offset}" size="{array.nbytes}"/>'
            f'<output><port id="0" precision="FP32" names="m.{name}"/></output></layer>')


def write_ir(folder: Path, *, prologue: str = "", size: int | None = None) -> Path:
    """A two-constant graph (a float32 [2, 3] weight, an int64 [2] bias) feeding a MatMul, and its .bin."""
    blob = WEIGHT.tobytes() + BIAS.tobytes()
    xml = (f'<?xml version="1.0"?>{prologue}<net name="tiny" version="10"><layers>'
           '<layer id="0" name="x" type="Parameter" version="opset1"><data shape="1, 3" element_type="f32"/>'
           '<output><port id="0" names="x"/></output></layer>'
           + _const(1, "weight", WEIGHT, 0, "f32") + _const(2, "bias", BIAS, WEIGHT.nbytes, "i64")
           + '<layer id="3" name="mm" type="MatMul" version="opset1"><output><port id="2"/></output></layer>'
           '</layers><edges><edge from-layer="0" from-port="0" to-layer="3" to-port="0"/>'
           '<edge from-layer="1" from-port="0" to-layer="3" to-port="1"/></edges></net>')
    (folder / "net.xml").write_text(xml)
    (folder / "net.bin").write_bytes(blob[:size] if size is not None else blob)
    return folder / "net.xml"


def test_constants_come_from_their_declared_place(tmp_path: Path) -> None:
    graph = read_ir(write_ir(tmp_path))
    named = graph.named_constants()
    assert set(named) == {"m.weight", "m.bias"}
    np.testing.assert_array_equal(graph.constant(named["m.weight"]), WEIGHT)
    np.testing.assert_array_equal(graph.constant(named["m.bias"]), BIAS)
    [matmul] = graph.of_type("MatMul")
    assert graph.producer(matmul, 1).id == 1 and matmul.inputs == [0, 1]
    assert graph.layers[0].consumers == [3]


def test_entities_and_document_types_are_refused_unexpanded(tmp_path: Path) -> None:
    laughs = ('<!DOCTYPE net [<!ENTITY a "aaaaaaaaaa"><!ENTITY b "&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;">'
              '<!ENTITY c "&b;&b;&b;&b;&b;&b;&b;&b;&b;&b;">]>')
    external = f'<!DOCTYPE net [<!ENTITY secret SYSTEM "file://{tmp_path / "secret.txt"}">]>'
    (tmp_path / "secret.txt").write_text("do not read")
    for prologue in (laughs, external, "<!DOCTYPE net>"):
        path = write_ir(tmp_path, prologue=prologue)
        with pytest.raises(InputError, match="net.xml: is not a readable IR graph") as caught:
            read_ir(path)
        assert "do not read" not in str(caught.value)


def test_a_bin_cut_short_names_the_bin(tmp_path: Path) -> None:
    graph = read_ir(write_ir(tmp_path, size=30))
    np.testing.assert_array_equal(graph.constant(graph.named_constants()["m.weight"]), WEIGHT)  # bytes 0-24
    with pytest.raises(InputError, match=r"net\.bin: is 30 bytes, but constant 'bias' lies at 24\.\.40"):
        graph.constant(graph.named_constants()["m.bias"])


def test_declarations_that_disagree_are_refused(tmp_path: Path) -> None:
    path = write_ir(tmp_path)
    text = path.read_text()
    for broken, problem in ((text.replace('size="24"', 'size="20"'), "do not agree"),
                            (text.replace('element_type="i64"', 'element_type="u1"'), "element type"),
                            (text.replace('offset="24"', 'offset="-8"'), "do not agree")):
        path.write_text(broken)
        graph = read_ir(path)
        with pytest.raises(InputError, match=problem):
            for layer in graph.named_constants().values():
                graph.constant(layer)


def test_files_that_are_not_ir_graphs(tmp_path: Path) -> None:
    path = write_ir(tmp_path)
    for text, problem in (("not xml at all", "not a readable IR graph"),
                          ('<model version="10"/>', "not an OpenVINO IR v10/v11 graph"),
                          ('<net version="10"><layers/></net>', "no <layers> or <edges>"),
                          ('<net version="10"><layers/><edges><edge from-layer="0" to-layer="1"/></edges></net>',
                           "not a well-formed IR graph")):
        path.write_text(text)
        with pytest.raises(InputError, match=problem):
            read_ir(path)
    path.with_suffix(".bin").unlink()
    with pytest.raises(InputError, match=r"net\.bin: is missing"):
        read_ir(path)


def test_another_network_is_not_taken_for_mobilestylegan(tmp_path: Path) -> None:
    path = write_ir(tmp_path)
    with pytest.raises(InputError, match=r"net\.xml: .*not MobileStyleGAN"):
        load_mobile_generator(path, path)


def test_a_truncated_real_synthesis_file_names_itself(mobile_models: Path, tmp_path: Path) -> None:
    folder = tmp_path / "mobilestylegan"
    shutil.copytree(mobile_models / "mobilestylegan", folder)
    synthesis = folder / "SynthesisNetwork.bin"
    synthesis.write_bytes(synthesis.read_bytes()[:1_000_000])
    with pytest.raises(InputError, match=r"SynthesisNetwork\.bin: is 1000000 bytes, but constant"):
        load_mobile_generator(folder / "MappingNetwork.xml", folder / "SynthesisNetwork.xml")
