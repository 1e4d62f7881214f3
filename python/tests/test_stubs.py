"""The type stubs say what the modules have: the numpy classes' signatures, and the names of
``fusedopt._engine`` and its ``Engine``."""

import ast
import inspect
import pathlib

import fusedopt
from fusedopt import _engine

PACKAGE = pathlib.Path(fusedopt.__file__).parent


def stub(name):
    return ast.parse((PACKAGE / name).read_text())


def test_the_numpy_stubs_have_the_classes_signatures():
    classes = {n.name: n for n in stub("_numpy.pyi").body if isinstance(n, ast.ClassDef)}
    for name in ["SGD", "Momentum", "AdaGrad", "RMSProp", "Adam", "Adamax", "Lion", "RAdam", "NAdam", "AdEMAMix", "ScheduleFreeAdamW", "ScheduleFreeSgd", "Lamb", "Lars"]:
        init = next(f for f in classes[name].body if isinstance(f, ast.FunctionDef) and f.name == "__init__")
        args = init.args
        declared = [(a.arg, "positional") for a in args.args[1:]] + [(a.arg, "keyword") for a in args.kwonlyargs]
        defaults = [ast.literal_eval(d) for d in args.defaults + args.kw_defaults]
        actual = inspect.signature(getattr(fusedopt, name)).parameters.values()
        kinds = {inspect.Parameter.POSITIONAL_OR_KEYWORD: "positional", inspect.Parameter.KEYWORD_ONLY: "keyword"}
        assert declared == [(p.name, kinds[p.kind]) for p in actual], name
        assert defaults == [p.default for p in actual], name
    assert issubclass(fusedopt.Nesterov, fusedopt.Momentum) and "Nesterov" in classes


def test_the_engine_stubs_name_what_the_module_has():
    tree = stub("_engine.pyi")
    functions = {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}
    engine = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Engine")
    members = {n.name for n in engine.body if isinstance(n, ast.FunctionDef)}
    members |= {n.target.id for n in engine.body if isinstance(n, ast.AnnAssign)}
    runtime = {n for n in dir(_engine.Engine) if not n.startswith("_")}
    assert runtime == {m for m in members if not m.startswith("_")}
    assert {n for n in dir(_engine) if callable(getattr(_engine, n)) and not n[0].isupper()} - {
        "__getattr__"
    } <= functions | {n for n in dir(_engine) if n.startswith("__")}
