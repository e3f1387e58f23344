// The official Foxglove WebSocket client (@foxglove/ws-protocol) against a real robonet hub.
// Run by tests/test_foxglove_node.py:  node client.js ws://127.0.0.1:PORT/ DEVICE_ID [MESSAGES]
//
// Prints one JSON object per line on stdout: serverInfo, advertise, subscribed, message (decoded
// JSON payload), published, status, done. The test drives the robot itself; this script
// subscribes to /<DEVICE_ID>/telemetry, waits for MESSAGES (default 2) messages, then advertises
// /<DEVICE_ID>/robot_move and publishes one robot_move {x: 0.5, y: -0.25}. Exits 2 after 20 s.
"use strict";

const { FoxgloveClient } = require("@foxglove/ws-protocol");
const WebSocket = require("ws");

const [url, deviceId, wantArg] = process.argv.slice(2);
const want = Number(wantArg || 2);
const topic = `/${deviceId}/telemetry`;
const out = (obj) => process.stdout.write(JSON.stringify(obj) + "\n");
const decoder = new TextDecoder();

const timer = setTimeout(() => {
  out({ event: "timeout" });
  process.exit(2);
}, 20000);

const client = new FoxgloveClient({
  ws: new WebSocket(url, [FoxgloveClient.SUPPORTED_SUBPROTOCOL]),
});
let subscribed = false;
let received = 0;
let published = false;

client.on("error", (err) => out({ event: "error", message: String(err && err.message) }));
client.on("serverInfo", (info) => out({ event: "serverInfo", info }));
client.on("status", (status) => out({ event: "status", status }));
client.on("close", () => out({ event: "close" }));
client.on("advertise", (channels) => {
  out({ event: "advertise", channels });
  const ch = channels.find((c) => c.topic === topic);
  if (ch && !subscribed) {
    subscribed = true;
    const id = client.subscribe(ch.id);
    out({ event: "subscribed", subscriptionId: id, channelId: ch.id });
  }
});
client.on("message", ({ subscriptionId, timestamp, data }) => {
  const text = decoder.decode(new Uint8Array(data.buffer, data.byteOffset, data.byteLength));
  received += 1;
  out({ event: "message", subscriptionId, timestamp: timestamp.toString(), data: JSON.parse(text) });
  if (received >= want && !published) {
    published = true;
    const channelId = client.advertise({
      topic: `/${deviceId}/robot_move`,
      encoding: "json",
      schemaName: "robonet.robot_move",
    });
    client.sendMessage(channelId, new TextEncoder().encode(JSON.stringify({ x: 0.5, y: -0.25 })));
    out({ event: "published", channelId });
    setTimeout(() => {
      out({ event: "done" });
      clearTimeout(timer);
      client.close();
      setTimeout(() => process.exit(0), 100);
    }, 1000);
  }
});
