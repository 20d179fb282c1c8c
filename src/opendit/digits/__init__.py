"""The bundled digits models: their data (scikit-learn's 8x8 digits and the moving-digits videos made from them), the
judges that score samples, and the trained weights shipped in weights/ (the default model of `opendit sample`)."""

from pathlib import Path

WEIGHTS_DIR = Path(__file__).parent / "weights"
