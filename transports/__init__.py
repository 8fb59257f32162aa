"""Downstream links and the device protocol (SMP over UART and BLE)."""
