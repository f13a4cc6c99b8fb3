from setuptools import find_packages, setup

# Pinned to versions seen to install together on Python 3.11 (protobuf <7 and numpy <2.5 for Beam).
INSTALL_REQUIRES = [
    "tensorflow==2.21.0",
    "keras==3.15.1",
    "tensorboard==2.21.0",
    "tensorflow-serving-api==2.21.0",
    "apache-beam[tfrecord]==2.77.0",
    "google-crc32c==1.9.0",
    "protobuf==6.33.6",
    "numpy==2.4.6",
    "scipy==1.17.1",
    "scikit-learn==1.9.1",
    "nibabel==5.4.2",
    "SimpleITK==2.5.7",  # NRRD, MetaImage and DICOM pixels (hagan-preprocess, hagan-encode)
    "pydicom==3.0.2",  # DICOM headers: series discovery and slice checks
    "pyyaml==6.0.3",
    "matplotlib==3.11.2",
    "tqdm==4.70.1",
    "grpcio==1.85.1",
    "aiohttp==3.14.5",  # hagan-serve's REST server
]

setup(
    name="hagan-tf",
    version="0.1.0",
    description="HA-GAN (Hierarchical Amortized GAN) for 3D medical volumes in TensorFlow/Keras",
    long_description=open("README.md").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11,<3.13",
    packages=find_packages(include=["hagan_tf", "hagan_tf.*"]),
    package_data={"hagan_tf": ["configs/*.yaml"]},
    install_requires=INSTALL_REQUIRES,
    extras_require={
        "test": ["pytest==9.2.0", "pytest-xdist==3.8.0", "import-linter==2.16"],
        "torch": ["torch==2.13.0"],
    },
    entry_points={
        "console_scripts": [
            "hagan-quickstart=hagan_tf.quickstart:main",
            "hagan-summary=hagan_tf.quickstart:summary_main",
            "hagan-preprocess=hagan_tf.preprocess.beam:main",
            "hagan-train=hagan_tf.training.cli:main",
            "hagan-export=hagan_tf.serving.export:main",
            "hagan-serve=hagan_tf.serving.server:main",
            "hagan-sample=hagan_tf.serving.sample_cli:sample_main",
            "hagan-encode=hagan_tf.serving.encode_cli:encode_main",
            "hagan-evaluate=hagan_tf.evaluation.cli:main",
            "hagan-embed=hagan_tf.apps.embed:main",
            "hagan-regress=hagan_tf.apps.regress:main",
            "hagan-directions=hagan_tf.apps.directions:main",
            "hagan-augment=hagan_tf.apps.augment:main",
            "hagan-import-torch=hagan_tf.torch_import:main",
        ],
    },
)
