"""Emulators of both ends (AWS IoT, SMP devices) for tests, benchmarks and the demo."""
