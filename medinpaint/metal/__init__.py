"""Metal-artifact physics for CT: materials, fan-beam projector, simulator, classical MAR, masks."""
