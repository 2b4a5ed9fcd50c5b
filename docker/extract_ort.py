"""Copies ONNX Runtime's shared libraries out of a PyPI wheel (used by the Dockerfiles' ort stage).

    python3 extract_ort.py WHEEL_DIR DEST_DIR VERSION

Takes libonnxruntime.so.VERSION and, when the wheel has them (onnxruntime-gpu),
libonnxruntime_providers_{shared,cuda}.so; the TensorRT provider is left out (no TensorRT in the
image). Fails when the main library is missing, so a renamed wheel layout breaks the build, not the pod.
"""
import glob
import os
import sys
import zipfile

wheel_dir, dest, version = sys.argv[1:]
wheels = sorted(glob.glob(os.path.join(wheel_dir, "onnxruntime*-%s-*.whl" % version)))
if len(wheels) != 1:
    sys.exit("expected one onnxruntime wheel of version %s in %s, found %s" % (version, wheel_dir, wheels))
wanted = {
    "libonnxruntime.so.%s" % version,
    "libonnxruntime_providers_shared.so",
    "libonnxruntime_providers_cuda.so",
}
os.makedirs(dest, exist_ok=True)
found = []
with zipfile.ZipFile(wheels[0]) as z:
    for name in z.namelist():
        base = os.path.basename(name)
        if name.startswith("onnxruntime/capi/") and base in wanted:
            with open(os.path.join(dest, base), "wb") as f:
                f.write(z.read(name))
            found.append(base)
if "libonnxruntime.so.%s" % version not in found:
    sys.exit("libonnxruntime.so.%s not in %s" % (version, wheels[0]))
os.symlink("libonnxruntime.so.%s" % version, os.path.join(dest, "libonnxruntime.so"))
print("extracted", sorted(found))
