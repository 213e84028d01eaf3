"""Packages: installed by the service into the running kernel; refusals as the API's codes."""

from __future__ import annotations

import pytest

from kernelbox import InvalidPackageSpec, Kernelbox, NotSupported, Session


def test_a_package_installs_and_imports_in_the_running_kernel(session: Session) -> None:
    report = session.packages.install(["six==1.16.0"])
    assert report.ok, report.log
    assert report.language == "python"
    assert [(p.name, p.version, p.error) for p in report.packages] == [("six", "1.16.0", None)]
    assert any(w.startswith("six-1.16.0") for w in report.installed)
    assert session.run("import six; six.__version__").text == "'1.16.0'"


def test_refused_specs_and_languages(kb: Kernelbox, session: Session) -> None:
    with pytest.raises(InvalidPackageSpec) as e:
        session.packages.install(["--index-url=http://example.invalid/ six"])
    assert e.value.status == 422
    with kb.session("bash") as bash:
        with pytest.raises(NotSupported):
            bash.packages.install(["six"])
