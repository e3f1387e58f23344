from twisted.application.service import ServiceMaker

robonet = ServiceMaker(
    "robonet", "robonet.tap", "Robot fleet hub: bot links, line links, camera, discovery, peers, web dashboard.", "robonet"
)
