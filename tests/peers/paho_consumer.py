"""A paho-mqtt (MQTT 5) consumer for the end-to-end tests: connects over TLS with a
client certificate, subscribes, and prints one line per event, flushed:
SUBSCRIBED, MSG <topic> <payload>, DISCONNECTED <reason>. It exits on the first
disconnect (paho would reconnect by itself and hide it) and when stdin closes.

usage: paho_consumer.py HOST PORT CAFILE CERT KEY CLIENT_ID FILTER
"""

import os
import sys
import threading

import paho.mqtt.client as mqtt


def say(line):
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def main():
    host, port, ca, cert, key, client_id, topic_filter = sys.argv[1:8]
    client = mqtt.Client(
        mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5
    )
    client.tls_set(ca_certs=ca, certfile=cert, keyfile=key)

    def on_connect(c, _userdata, _flags, reason, _props):
        if reason.is_failure:
            say(f"DISCONNECTED connect refused: {reason}")
            os._exit(3)
        c.subscribe(topic_filter, qos=1)

    def on_subscribe(_c, _userdata, _mid, reasons, _props):
        say("SUBSCRIBED " + ",".join(str(r) for r in reasons))

    def on_message(_c, _userdata, msg):
        payload = msg.payload.decode("utf-8", "replace")
        say(f"MSG {msg.topic} {payload}")

    def on_disconnect(_c, _userdata, _flags, reason, _props):
        say(f"DISCONNECTED {reason}")
        os._exit(3)

    client.on_connect = on_connect
    client.on_subscribe = on_subscribe
    client.on_message = on_message
    client.on_disconnect = on_disconnect
    client.connect(host, int(port), keepalive=30)

    # The test ends the consumer by closing stdin.
    def watch_stdin():
        sys.stdin.read()
        os._exit(0)

    threading.Thread(target=watch_stdin, daemon=True).start()
    client.loop_forever()


if __name__ == "__main__":
    main()
