"""Adds `optimum-cli hubtool ...`: optimum-cli imports every module of this namespace package."""

from hubtool.integrations.optimum import REGISTER_COMMANDS  # noqa: F401
