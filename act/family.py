"""(placeholder until the model-family protocol lands: the registry lookup by name)"""


def family_named(name):
    from teachers.ultralytics_yolo import UltralyticsYOLO

    return UltralyticsYOLO()
