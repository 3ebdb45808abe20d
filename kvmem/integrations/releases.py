"""The releases of an engine library that an integration was checked on, and the one check of them.

Each integration (transformers, vLLM, SGLang) relies on internals of its library that change
between releases, so each declares the range it was read and tested against and refuses any other
release loudly, naming the range, rather than misbehaving later. The ranges and the reasons live
in each integration's ``version`` module; this is the check they share.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class SupportedReleases:
    """Releases of `package` from `minimum` up to, not including, `maximum`.

    Attributes:
        integration: The integration's name in messages ("vLLM").
        package: The library's name in messages and version specifiers ("vllm").
        minimum: The oldest supported release.
        maximum: The first release not supported.
    """

    integration: str
    package: str
    minimum: str
    maximum: str

    @property
    def spec(self) -> str:
        return f">={self.minimum},<{self.maximum}"

    def check(
        self,
        installed: Callable[[], str],
        error: type[Exception],
        relies_on: str,
        remedy: str,
        version: str | None = None,
        install_hint: str = "",
    ) -> str:
        """Return the installed release (or `version`, for tests) if it is in the range.

        Args:
            installed: Returns the installed release; raises ImportError (a PackageNotFoundError is
                one) if the library is missing.
            error: The integration's exception type.
            relies_on: What the range protects, for the message.
            remedy: What to do about an unsupported release, for the message.
            version: A release to check instead of the installed one.
            install_hint: Appended to the message when the library is missing.

        Raises:
            error: The library is missing, or its release is outside the range.
        """
        if version is None:
            try:
                version = installed()
            except ImportError as exc:
                raise error(
                    f"kvmem's {self.integration} integration needs {self.package} {self.spec}; it is not "
                    f"installed{install_hint}"
                ) from exc
        from packaging.version import Version  # a dependency of each of these libraries

        # Local labels such as "0.32.0+cpu" name the same release.
        if not Version(self.minimum) <= Version(Version(version).base_version) < Version(self.maximum):
            raise error(
                f"kvmem's {self.integration} integration supports {self.package} {self.spec} ({relies_on}); "
                f"{self.package} {version} is installed. {remedy}"
            )
        return version
