"""params.yaml as one typed, validated Config (config.py), the keys each stage may read (stage_params.py), the
device and dtype as torch objects (device.py), and checks of params against the loaded model (limits.py)."""
