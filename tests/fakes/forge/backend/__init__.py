"""Fake of Forge 2.x's ``backend`` package: the pieces TE Switch touches, re-implemented small.

Class names, module paths, attribute names and method signatures follow
lllyasviel/stable-diffusion-webui-forge @ dfdcbab; the math is real torch (no mocks).
"""
