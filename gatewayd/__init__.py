"""ota-gateway daemon: AWS IoT OTA agent role for edge gateways."""
