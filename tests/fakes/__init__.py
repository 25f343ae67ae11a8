"""Fake WebUI trees for tests (the sd-dynamic-prompts approach), small and faithful to the real
signatures of A1111 1.10.1 and Forge 2.0.1.

``common/modules`` holds what both hosts share (options, shared, scripts, script_callbacks,
patches...); ``a1111/`` and ``forge/`` add each host's own modules. ``modules`` is a namespace
package in the real WebUIs too (no ``__init__.py``), so a host tree and the common tree merge.
"""
