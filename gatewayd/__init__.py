"""ota-gateway daemon: AWS IoT OTA agent role for edge gateways."""


def version() -> str:
    """The installed package's version (what --version prints)."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed

    try:
        return installed("ota-gateway")
    except PackageNotFoundError:
        return "(not installed)"
