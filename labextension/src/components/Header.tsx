import * as React from 'react';
import { refreshIcon, ToolbarButtonComponent } from '@jupyterlab/ui-components';

import { NSMLModel } from '../model';
import { formatCredits, formatTimeLeft } from '../format';

/** The balance and the time it lasts at the current burn rate, with the stream's state. */
export function Header(props: { model: NSMLModel; onRefresh: () => void }): JSX.Element {
  const { model } = props;
  const me = model.me;
  const rate = model.burnRate;
  return (
    <div className="jp-NSML-header">
      <div className="jp-NSML-balance" aria-label="Balance">
        <span className="jp-NSML-balance-value" title="Your NSML credits">
          {me ? formatCredits(me.credits) : '—'}
        </span>
        <span className="jp-NSML-balance-unit"> credits</span>
        <div className="jp-NSML-timeleft">{me ? formatTimeLeft(me.credits, rate) : ''}</div>
      </div>
      <span
        role="status"
        className={`jp-NSML-live ${model.live ? 'jp-mod-live' : ''}`}
        title={model.live ? 'Live: updates arrive as they happen' : 'Not live: refresh by hand'}
        aria-label={model.live ? 'live' : 'offline'}
      >
        ●
      </span>
      <ToolbarButtonComponent
        icon={refreshIcon}
        onClick={props.onRefresh}
        tooltip="Refresh"
        label=""
      />
    </div>
  );
}
